"""What `uenvfs attach` costs when the tasks of a job start at once (issue 28).

Usage (as root, from a checkout where scripts/setup has run):

    .venv/bin/python scripts/attachcost.py [--tasks 1,16,64] [--rounds 5] [--source DIR]
    .venv/bin/python scripts/attachcost.py --quick          a smoke run: 1 and 4 tasks, once

Runs a real `uenvfs serve` (the code of --source, default this checkout; hold time 3600 s,
`--config /dev/null`) on a small image whose meta/env.json puts it at a directory this script
makes (WORKDIR/run/ue), and `acquire`s it for the allocation slurm-1, as the Slurm prolog
does. After one untimed task (the first attach mounts the image, as the first task of the
first job does), for each count of --tasks, each round (the counts taking turns within a round),
starts that many tasks at once, each as the SPANK plugin (scripts/slurm/uenvfs_spank.c) starts
one: a mount namespace of its own whose mounts are slaves of the host's (`unshare --mount
--propagation slave`), in which `uenvfs attach slurm-1` binds the image at its mount point and
prints UENV_MOUNT_LIST. A task is attached when that line comes; it then waits, holding its
namespace, until every task of the round is checked:

  - each task's mount point is squashfs on the image's device (`.status` "device"): the
    image's own kernel mount, not a copy and not uenvfs's FUSE directory;
  - the node still has one loop device for the image (`losetup -j`), one squashfs mount of
    that device in the host's mount namespace (the daemon's backing mount);
  - `.status` counts every task's namespace (`namespaces`, at least one per task: a tree
    handed out counts for 10 s whatever the scans find, so a task of the round before may
    still count) within COUNT_TIMEOUT; how long it took is in the JSON (`counted_after_s`).
    Each task has SLURM_JOB_ID=1, as slurmstepd sets it.

Figures per count: the wall time from the first task's start until every task is attached,
each task's own time from its start until it is attached (median and max over every task of
every round), the CPU seconds each task used (user + system, its processes' rusage: on a
node with fewer cores than tasks, the wall time is about tasks x this / cores), and the uenvfs
server's CPU seconds per task (/proc/PID/stat, user + system, over the round). They are
printed beside what uenv's own SPANK plugin (which loop-mounts the image in every task) was
measured at by its users: 0.07 s for 1 task, 1.03 s for 64, 1.87 s for 128. The JSON (--json,
default bench-results/attachcost.json) has every round.

Every task is ended, the image released, the daemon stopped with SIGTERM and every mount of the
work directory (default /var/tmp/uenvfs-attachcost) cleared, also on error and on Ctrl-C.
Exit status: 0, or 1 if a check failed or something was left behind. On a shared 2-core
machine the times are noisy and grow with other load: repeat, and compare medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import cpu_seconds, git_label, interrupt, positive, uninterruptible, write_json

from tests.mounts import clean_up, is_mounted, mounts_under, wait_until
from uenvfs.kernel import mountinfo

REPO = Path(__file__).resolve().parent.parent
IMAGE = "attachenv"
ALLOC = "slurm-1"
DEFAULT_WORKDIR = Path("/var/tmp/uenvfs-attachcost")
DEFAULT_JSON = Path("bench-results/attachcost.json")
READY_TIMEOUT = 60.0
ATTACH_TIMEOUT = 300.0  # seconds a round's tasks may take to attach, all of them
COUNT_TIMEOUT = 15.0  # seconds `.status` may take after that to count every task's namespace
# uenv's SPANK plugin, which loop-mounts the image in every task, as its users measured it.
UENV_PLUGIN = {1: 0.07, 64: 1.03, 128: 1.87}
# The task: attach's output is its first line; then it holds its namespace until stdin ends.
TASK_SCRIPT = '"$@" || exit 1; read -r _'


class AttachError(Exception):
    """The measurement cannot go on, or a check failed; the message says why."""


@dataclass(frozen=True)
class Settings:
    tasks: tuple[int, ...]
    rounds: int
    workdir: Path
    json_path: Path
    source: Path

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def mount_point(self) -> Path:
        """The image's mount point in its meta/env.json: where each task has it."""
        return self.run_dir / "ue"


@dataclass
class Daemon:
    """A `uenvfs serve` of the image in run_dir; `stop` takes it down (idempotent)."""

    settings: Settings
    process: subprocess.Popen[bytes] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def mountpoint(self) -> Path:
        return self.settings.run_dir / "uenv"

    @property
    def log(self) -> Path:
        return self.settings.run_dir / "uenvfs.log"

    def start(self) -> None:
        run_dir = self.settings.run_dir
        command = [sys.executable, "-m", "uenvfs", "serve", "--mountpoint", str(self.mountpoint),
                   "--images", str(run_dir / "images"), "--state-dir", str(run_dir / "state"),
                   "--hold-time", "3600", "--config", "/dev/null"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log, env=self.env(), start_new_session=True)
        wait_until(self.serving, READY_TIMEOUT, "uenvfs to serve", error=AttachError)

    def env(self) -> dict[str, str]:
        """Run the code of --source (`python -m uenvfs`, as scripts/bench.py does)."""
        return {**os.environ, "PYTHONPATH": str(self.settings.source)}

    def serving(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AttachError(f"uenvfs serve exited {self.process.returncode} (log: {self.log})")
        return is_mounted(self.mountpoint, "fuse") and b" serving " in self.log.read_bytes()

    def status(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads((self.mountpoint / ".status").read_bytes())
        return document

    def image(self) -> dict[str, Any]:
        entry: dict[str, Any] = next(m for m in self.status()["mounts"] if m["name"] == IMAGE)
        return entry

    def control(self, line: str) -> None:
        (self.mountpoint / ".control").write_text(line + "\n")

    def stop(self) -> None:
        """Release the image and SIGTERM the daemon: it unmounts everything and exits 0."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.control(f"release {ALLOC}")
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.problems.append("uenvfs did not stop 60 s after SIGTERM; killed")
            self.process.kill()
            self.process.wait()
        if self.process.returncode != 0:
            self.problems.append(f"uenvfs exited {self.process.returncode} (log: {self.log})")


@dataclass
class Task:
    """One task: its `unshare` process, when it started, and when attach's line came."""

    process: subprocess.Popen[str]
    started: float
    attached: float | None = None
    line: str = ""


def build_image(settings: Settings) -> None:
    """A small uenv image for the mount point settings.mount_point."""
    src = settings.run_dir / "src"
    (src / "meta").mkdir(parents=True)
    (src / "bin").mkdir()
    (src / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    mount = str(settings.mount_point)
    (src / "meta" / "env.json").write_text(json.dumps({
        "name": IMAGE, "description": "scripts/attachcost.py", "mount": mount,
        "views": {"default": {"root": f"{mount}/env", "env": {"version": 1, "values": {}}}}}))
    images = settings.run_dir / "images"
    images.mkdir()
    subprocess.run(["gensquashfs", "-q", "-D", str(src), str(images / f"{IMAGE}.sqfs")],
                   check=True)


def start_task(daemon: Daemon) -> Task:
    command = ["unshare", "--mount", "--propagation", "slave", "sh", "-c", TASK_SCRIPT, "task",
               sys.executable, "-m", "uenvfs", "attach", "--mountpoint", str(daemon.mountpoint),
               ALLOC]
    started = time.perf_counter()
    env = {**daemon.env(), "SLURM_JOB_ID": ALLOC.removeprefix("slurm-")}  # as slurmstepd's
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    return Task(process, started)


def wait_attached(task: Task) -> None:
    """Read attach's line (its thread's job: the tasks are read at the same time)."""
    stdout: IO[str] | None = task.process.stdout
    assert stdout is not None
    task.line = stdout.readline().strip()
    task.attached = time.perf_counter()


def run_round(daemon: Daemon, count: int) -> dict[str, Any]:
    """*count* tasks at once; their times, checked as the module docstring says."""
    server = int(daemon.status()["server"]["pid"])
    cpu_before, tasks_before = cpu_seconds(server), children_cpu()
    tasks: list[Task] = []
    try:
        readers = []
        for _ in range(count):
            tasks.append(start_task(daemon))
            readers.append(threading.Thread(target=wait_attached, args=(tasks[-1],)))
            readers[-1].start()
        for reader in readers:
            reader.join(ATTACH_TIMEOUT)
        end = time.perf_counter()
        cpu = cpu_seconds(server) - cpu_before
        counted = check_round(daemon, tasks)
    finally:
        end_tasks(tasks)
    per_task = [task.attached - task.started for task in tasks if task.attached is not None]
    return {"tasks": count, "wall_s": end - tasks[0].started, "per_task_s": per_task,
            "server_cpu_s": cpu, "tasks_cpu_s": children_cpu() - tasks_before,
            "counted_after_s": counted}


def children_cpu() -> float:
    """The user and system CPU seconds of this process's children that have ended: the tasks
    (unshare, sh and `uenvfs attach`) and the checks' few `losetup`."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def check_round(daemon: Daemon, tasks: list[Task]) -> float:
    """Every task attached the image's own mount; the node has one of it (module docstring).
    Returns how long `.status` took to count every task's namespace."""
    image = daemon.image()
    major, minor = (int(number) for number in image["device"].split(":"))
    device = os.makedev(major, minor)
    expected = f"{daemon.settings.run_dir / 'images' / IMAGE}.sqfs:{daemon.settings.mount_point}"
    for task in tasks:
        if task.line != expected:
            stderr = task.process.stderr
            error = "" if task.process.poll() is None or stderr is None else stderr.read()
            raise AttachError(f"a task printed {task.line!r}, not {expected!r}: {error.strip()}")
        table = mountinfo.read(f"/proc/{task.process.pid}/mountinfo")
        found = mountinfo.mount_at(daemon.settings.mount_point, table)
        if found is None or (found.fstype, found.device) != ("squashfs", device):
            raise AttachError(f"a task has {found} at its mount point, not the squashfs of "
                              f"{image['device']}")
    loops = subprocess.run(["losetup", "-n", "-O", "NAME", "-j", image["image_path"]],
                           capture_output=True, text=True, check=True).stdout.split()
    host = mountinfo.mounts_of({device})
    if len(loops) != 1 or len(host) != 1:
        raise AttachError(f"{len(loops)} loop devices ({loops}), {len(host)} mounts of "
                          f"{image['device']} in the host's namespace: not one per node")
    began = time.monotonic()
    while (holders := namespaces(daemon)) < len(tasks):
        if time.monotonic() - began > COUNT_TIMEOUT:
            raise AttachError(f".status counts {holders} namespaces for {len(tasks)} tasks, "
                              f"{COUNT_TIMEOUT:g} s after they attached")
        time.sleep(0.2)
    return time.monotonic() - began


def namespaces(daemon: Daemon) -> int:
    """The mount namespaces that `.status` counts as holding the image, all allocations'."""
    return sum(use.get("namespaces", 0) for use in daemon.image()["allocations"].values())


def end_tasks(tasks: list[Task]) -> None:
    """Close each task's stdin (it ends, and its namespace with it); kill one that hangs."""
    for task in tasks:
        with contextlib.suppress(OSError):
            assert task.process.stdin is not None
            task.process.stdin.close()
    for task in tasks:
        try:
            task.process.wait(30)
        except subprocess.TimeoutExpired:
            task.process.kill()
            task.process.wait()
        for pipe in (task.process.stdout, task.process.stderr):
            if pipe is not None:
                pipe.close()


def measure(settings: Settings) -> tuple[list[dict[str, Any]], list[str]]:
    """Every round of every count of tasks; the problems left behind."""
    daemon = Daemon(settings)
    rounds: list[dict[str, Any]] = []
    try:
        build_image(settings)
        settings.mount_point.mkdir()
        daemon.start()
        daemon.control(f"acquire {IMAGE} {ALLOC}")
        run_round(daemon, 1)  # untimed: the first attach mounts the image
        for number in range(settings.rounds):
            for count in settings.tasks:
                result = run_round(daemon, count)
                rounds.append({"round": number, **result})
                note(f"{count} tasks: every one attached in {result['wall_s']:.3f} s")
    finally:
        with uninterruptible():
            daemon.stop()
            left = clean_up(settings.run_dir)
            if left:
                daemon.problems.append("left behind, cleared lazily: " + ", ".join(left))
    return rounds, daemon.problems


def summary(rounds: list[dict[str, Any]], count: int) -> dict[str, Any]:
    mine = [r for r in rounds if r["tasks"] == count]
    walls = [r["wall_s"] for r in mine]
    per_task = [t for r in mine for t in r["per_task_s"]]
    return {"tasks": count, "rounds": len(mine), "wall_median_s": statistics.median(walls),
            "wall_min_s": min(walls), "wall_max_s": max(walls),
            "per_task_median_s": statistics.median(per_task), "per_task_max_s": max(per_task),
            "server_cpu_per_task_s": statistics.median(r["server_cpu_s"] / count for r in mine),
            "cpu_per_task_s": statistics.median(r["tasks_cpu_s"] / count for r in mine),
            "uenv_plugin_s": UENV_PLUGIN.get(count)}


def table(summaries: list[dict[str, Any]]) -> str:
    header = (f"{'tasks':>6}{'all attached':>22}{'per task median':>17}{'per task max':>14}"
              f"{'CPU/task':>10}{'server CPU/task':>17}{'uenv plugin':>13}")
    lines = [header, "-" * len(header)]
    for s in summaries:
        uenv = "n/a" if s["uenv_plugin_s"] is None else f"{s['uenv_plugin_s']:.2f} s"
        lines.append(f"{s['tasks']:>6}"
                     f"{s['wall_median_s']:>8.3f} s [{s['wall_min_s']:.2f}-{s['wall_max_s']:.2f}]"
                     f"{s['per_task_median_s']:>15.3f} s{s['per_task_max_s']:>12.3f} s"
                     f"{s['cpu_per_task_s']:>8.3f} s"
                     f"{s['server_cpu_per_task_s'] * 1000:>14.1f} ms{uenv:>13}")
    return "\n".join(lines)


def note(message: str) -> None:
    print(f"attachcost: {message}", file=sys.stderr, flush=True)


def task_counts(text: str) -> tuple[int, ...]:
    return tuple(positive(word) for word in text.split(",") if word.strip())


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description="What `uenvfs attach` costs for tasks starting at once (needs root).")
    parser.add_argument("--tasks", type=task_counts, metavar="N[,N...]",
                        help="tasks started at once, one count after the other "
                             "(default 1,16,64; 1,4 with --quick)")
    parser.add_argument("--rounds", type=positive, metavar="N",
                        help="rounds of every count (default 5, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 and 4 tasks, once")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, dest="json_path")
    parser.add_argument("--source", type=Path, default=REPO, metavar="DIR",
                        help="run the uenvfs code of this checkout (default: this one)")
    args = parser.parse_args(argv)
    return Settings(tasks=args.tasks or ((1, 4) if args.quick else (1, 16, 64)),
                    rounds=args.rounds or (1 if args.quick else 5),
                    workdir=args.workdir.absolute(), json_path=args.json_path.absolute(),
                    source=args.source.absolute())


def prepare(settings: Settings) -> None:
    if os.geteuid() != 0:
        raise AttachError("run me as root (a real uenvfs serve, unshare, acquire)")
    missing = [tool for tool in ("unshare", "gensquashfs", "losetup", "sh")
               if shutil.which(tool) is None]
    if missing:
        raise AttachError(f"missing tools: {', '.join(missing)}")
    settings.workdir.mkdir(parents=True, exist_ok=True)
    found = clean_up(settings.run_dir)
    if found:
        note("cleared what an earlier run left behind: " + ", ".join(found))
    if mounts_under(settings.run_dir):
        raise AttachError(f"cannot clear the mounts under {settings.run_dir}")
    shutil.rmtree(settings.run_dir, ignore_errors=True)
    settings.run_dir.mkdir()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        prepare(settings)
        rounds, problems = measure(settings)
    except AttachError as exc:
        note(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        note("interrupted; every task and mount was taken down")
        return 130
    summaries = [summary(rounds, count) for count in settings.tasks]
    machine = {"nproc": os.cpu_count(), "kernel": platform.release(),
               "python": platform.python_version(), "load": os.getloadavg(),
               "uenvfs_commit": git_label(settings.source, "unknown")}
    write_json(settings.json_path, {"machine": machine, "summary": summaries, "rounds": rounds,
                                    "problems": problems})
    print(f"uenvfs attach, tasks starting at once: {machine['nproc']} CPUs, Linux "
          f"{machine['kernel']}, uenvfs {machine['uenvfs_commit']}; {settings.rounds} rounds; "
          "median [min-max]; uenv plugin = uenv's own SPANK plugin, as its users measured it")
    print(table(summaries))
    for problem in problems:
        print(f"problem: {problem}")
    if not problems:
        shutil.rmtree(settings.run_dir, ignore_errors=True)
    print(f"JSON: {settings.json_path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
