"""Benchmark uenvfs against the kernel's squashfs and squashfuse_ll, all three in one run.

Usage (as root; the wrapper runs scripts/setup first, relative paths are from the repository):

    scripts/bench                        the full benchmark (builds 1.5 GiB of images once)
    scripts/bench --quick                a smoke run: small images, one repetition each
    scripts/bench --only find,import     a subset of the workloads
    scripts/bench --workdir DIR --json FILE --warm-runs N --cold-runs N

Images are built with mksquashfs (gzip, default block size), like real uenv images, and cached
in the work directory (default /var/tmp/uenvfs-bench; --quick uses its own small ones there):

    pyenv   env/lib/pythonX.Y: this interpreter's standard library (with lib-dynload) and the
            virtualenv's site-packages; at least 10,000 files
    data    random.bin (1 GiB of random bytes) and text.txt (1 GiB of compressible text)

Each image is mounted three ways: `mount -t squashfs -o ro,loop` (the baseline), squashfuse_ll,
and uenvfs (`uenvfs serve`, a separate process, hold time 3600 s). Workloads, by --only name:

    rss         uenvfs and squashfuse_ll daemon VmRSS: idle, after a stat walk of every inode,
                and after `echo 2 > drop_caches` (the kernel FORGETs its inodes) and another walk
    find        find ROOT -type f | wc -l
    stat        find ROOT -printf '%s\\n' | wc -l          (a stat of every entry)
    read        find ROOT -type f -print0 | xargs -0 cat   (read every file)
    import      the interpreter with -S and PYTHONHOME in the mount imports json, email,
                http.client, asyncio, xml.dom.minidom, sqlite3, decimal, unittest, trio, ...;
                every run checks that each module came from the mount, and fails if not
    seq         dd bs=1M of each 1 GiB file
    concurrent  both 1 GiB files read at once
    trigger     mount + first stat of a file: uenvfs after `expire` (its own lazy mount),
                the others as `mount`/`squashfuse_ll` + stat, each from a fresh process
    storm       64 processes at once, each `cat` of the same 200 files of the environment
                (16 with --quick)
    run         find, stat, read-all, import and storm in jobs started with `uenvfs run
                pyenv:MOUNT` (the image's own kernel mount bound at MOUNT, a directory the
                benchmark makes), against the kernel mount, each timed inside the job by the
                same timer (scripts/runrows.py); with the uenvfs server's CPU seconds meanwhile
    cpu         the uenvfs server's CPU seconds per 10,000 file accesses (read-all, warm):
                through its FUSE mount and in a job started with `uenvfs run`

Warm runs follow one untimed run; cold runs follow `sync; echo 3 > /proc/sys/vm/drop_caches`.
The three mounts take turns within each repetition (the kernel mount and the job, for run). The
table shows the median [min-max] per mount and the ratio of each FUSE median to the kernel's, a
second table the jobs' rows and the server's CPU (scripts/benchrows.py); the JSON (default
bench-results/bench.json) has every run, the images and the machine. Ratios measured in the same
run are the result: absolute times on a shared 2-core VM are noisy. Every mount and loop device
the benchmark makes is removed on exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import string
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The repository, for tests/mounts.py: the tests' helpers for mounts and loop devices.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import runrows
from benchrows import SYSTEMS, BenchError, Row, check_same, note, progress, table
from harness import choose, drop_caches, git_label, interrupt, positive, uninterruptible, write_json
from runrows import Job, JobWorkload, Place, job_place

from tests.mounts import clean_up, is_mounted, loops_for, mounts_under, wait_until

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("rss", "find", "stat", "read", "import", "seq", "concurrent", "trigger", "storm",
             "run", "cpu")
ENV_IMAGE = "pyenv"
DATA_IMAGE = "data"
DATA_WORKLOADS = {"seq", "concurrent"}
PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"
ENV_LIB = f"env/lib/{PYVER}"
TRIGGER_FILE = f"{ENV_LIB}/os.py"
DATA_FILES = ("random.bin", "text.txt")
IMPORTS = ("json", "email.parser", "email.policy", "http.client", "asyncio", "xml.dom.minidom",
           "sqlite3", "decimal", "unittest", "argparse", "logging", "trio")
MIN_ENV_FILES = 10_000
MIB = 1 << 20
FULL_DATA_SIZE = 1024 * MIB
QUICK_DATA_SIZE = 16 * MIB
STORM_PROCESSES = 64
QUICK_STORM_PROCESSES = 16
STORM_FILES = 200
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
DEFAULT_WORKDIR = Path("/var/tmp/uenvfs-bench")
DEFAULT_JSON = Path("bench-results/bench.json")

# Run by the benchmarked interpreter with PYTHONHOME in a mount: argv[1] is the mount (every
# module must come from under it), `--list` prints the files of the imported modules.
IMPORT_CODE = f"""
import sys
import {", ".join(IMPORTS)}
root = sys.argv[1].rstrip("/") + "/"
outside = sorted(name for name, module in sys.modules.items()
                 if not (getattr(module, "__file__", None) or root).startswith(root))
if outside or not json.__file__.startswith(root) or not sys.flags.no_site:
    sys.exit(f"modules from outside {{root}}: json from {{json.__file__}}, {{outside[:10]}}")
if sys.argv[2:] == ["--list"]:
    for module in list(sys.modules.values()):
        for path in (getattr(module, "__file__", None), getattr(module, "__cached__", None)):
            if path:
                print(path)
"""

# Run in a fresh process: time an optional mount command and the first stat of argv[1].
TRIGGER_CODE = """
import os, subprocess, sys, time
start = time.perf_counter()
if sys.argv[2:]:
    subprocess.run(sys.argv[2:], check=True)
os.stat(sys.argv[1])
print(time.perf_counter() - start)
"""


@dataclass(frozen=True)
class Settings:
    workdir: Path
    json_path: Path
    quick: bool
    only: tuple[str, ...]
    warm_runs: int
    cold_runs: int
    source: Path = REPO  # the uenvfs checkout whose code the daemon runs

    @property
    def images_dir(self) -> Path:
        return self.workdir / ("quick-images" if self.quick else "images")

    @property
    def build_dir(self) -> Path:
        return self.workdir / "build"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def storm_processes(self) -> int:
        return QUICK_STORM_PROCESSES if self.quick else STORM_PROCESSES

    def image_names(self) -> list[str]:
        names = []
        if set(self.only) - DATA_WORKLOADS:
            names.append(ENV_IMAGE)
        if set(self.only) & DATA_WORKLOADS:
            names.append(DATA_IMAGE)
        return names


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Benchmark uenvfs against kernel squashfs and squashfuse_ll (needs root).")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: ~500-file and 16 MiB images, one repetition each, "
                             f"a storm of {QUICK_STORM_PROCESSES} processes")
    parser.add_argument("--only", type=lambda text: choose(text, WORKLOADS, "workload"),
                        default=WORKLOADS, metavar="W[,W...]",
                        help="run only these workloads: " + ", ".join(WORKLOADS))
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"images are cached here (default {DEFAULT_WORKDIR})")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, dest="json_path",
                        help=f"write the results here (default {DEFAULT_JSON})")
    parser.add_argument("--warm-runs", type=positive, metavar="N",
                        help="timed warm repetitions (default 5, 1 with --quick)")
    parser.add_argument("--cold-runs", type=positive, metavar="N",
                        help="timed cold repetitions (default 3, 1 with --quick)")
    parser.add_argument("--source", type=Path, default=REPO, metavar="DIR",
                        help="run the uenvfs code of this checkout (e.g. a `git worktree` of "
                             "an older commit, for before/after figures; default: this one)")
    args = parser.parse_args(argv)
    quick_default = 1 if args.quick else None
    return Settings(
        workdir=args.workdir.absolute(),
        json_path=args.json_path.absolute(),
        quick=args.quick,
        only=args.only,
        warm_runs=args.warm_runs or quick_default or 5,
        cold_runs=args.cold_runs or quick_default or 3,
        source=args.source.absolute(),
    )


# -- small helpers ---------------------------------------------------------------------------


def run(command: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Run a setup command; its stdout, or BenchError with its stderr."""
    done = subprocess.run(list(command), capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(command)} failed (exit {done.returncode}): "
                         f"{done.stderr.strip()[-2000:]}")
    return done.stdout


def attempt(command: Sequence[str]) -> bool:
    """Run a clean-up command; whether it worked (clean-up goes on either way)."""
    done = subprocess.run(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False)
    return done.returncode == 0


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll *predicate* until it is true; BenchError after *timeout* seconds."""
    wait_until(predicate, timeout, what, error=BenchError)


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def tree_bytes(root: Path) -> int:
    return sum(entry.stat().st_size for entry in root.rglob("*") if entry.is_file())


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


# -- mounts and loop devices -----------------------------------------------------------------


def leftovers(workdir: Path) -> list[str]:
    """Mounts and loop devices still there after a short wait (autoclear loops detach late)."""
    with contextlib.suppress(BenchError):
        wait_for(lambda: not mounts_under(workdir) and not loops_for(workdir), 5.0, "clean-up")
    return [e.mount_point for e in mounts_under(workdir)] + loops_for(workdir)


def mount_command(system: str, image: Path, target: Path) -> list[str]:
    if system == "kernel":
        return ["mount", "-t", "squashfs", "-o", "ro,loop", str(image), str(target)]
    return ["squashfuse_ll", str(image), str(target)]


def unmount(system: str, target: Path) -> None:
    """Unmount a kernel or squashfuse_ll mount; lazily if it is busy."""
    command = ["umount", str(target)] if system == "kernel" else ["fusermount3", "-u", str(target)]
    if is_mounted(target) and not attempt(command):
        note(f"{shlex.join(command)} failed; unmounting lazily")
        attempt(["umount", "-l", str(target)])


@dataclass
class Mounts:
    """Every image mounted three ways under run_dir: <system>/<image name>.

    uenvfs serves all images at run_dir/uenvfs (its mountpoint), so its layout is the same.
    Each mount registers its own teardown on `stack` as soon as it exists. `problems` (a mount
    left behind, a daemon that did not stop cleanly) make the benchmark fail; `notes` do not.
    """

    run_dir: Path
    images_dir: Path
    images: dict[str, Path]
    stack: contextlib.ExitStack
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    squashfuse: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    uenvfs: subprocess.Popen[bytes] | None = None
    source: Path = REPO

    def root(self, system: str, name: str) -> Path:
        return self.run_dir / system / name

    @property
    def fuse_mountpoint(self) -> Path:
        return self.run_dir / "uenvfs"

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "uenvfs-state"

    @property
    def job_root(self) -> Path:
        """Where jobs started with `uenvfs run` have the environment image."""
        return self.run_dir / "job"

    @property
    def uenvfs_log(self) -> Path:
        return self.run_dir / "uenvfs.log"

    def backing(self, name: str) -> Path:
        return self.state_dir / "mnt" / name

    def mount_all(self) -> None:
        self.job_root.mkdir()
        for name, image in self.images.items():
            self.mount_kernel(name, image)
            self.start_squashfuse(name, image)
        self.start_uenvfs()

    def mount_kernel(self, name: str, image: Path) -> None:
        target = self.root("kernel", name)
        target.mkdir(parents=True, exist_ok=True)
        self.stack.callback(unmount, "kernel", target)
        run(mount_command("kernel", image, target))

    def start_squashfuse(self, name: str, image: Path) -> None:
        """squashfuse_ll in the foreground (-f), so that its pid is ours to read VmRSS from."""
        target = self.root("squashfuse_ll", name)
        target.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / f"squashfuse_ll-{name}.log").open("ab") as log:
            process = subprocess.Popen(["squashfuse_ll", "-f", str(image), str(target)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True)
        self.squashfuse[name] = process
        self.stack.callback(self.stop_squashfuse, process, target)
        wait_for(lambda: self.up(process, target, "squashfuse_ll"), READY_TIMEOUT,
                 f"squashfuse_ll on {target}")

    def stop_squashfuse(self, process: subprocess.Popen[bytes], target: Path) -> None:
        unmount("squashfuse_ll", target)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            self.problems.append(f"squashfuse_ll on {target} did not exit after unmount; killed")
            process.kill()
            process.wait()

    def start_uenvfs(self) -> None:
        mountpoint = self.fuse_mountpoint
        mountpoint.mkdir(parents=True, exist_ok=True)
        # `python -m uenvfs`, not the installed script: --source may be a checkout whose
        # package layout differs from the installed one.
        command = [sys.executable, "-m", "uenvfs", "serve",
                   "--mountpoint", str(mountpoint), "--images", str(self.images_dir),
                   "--state-dir", str(self.state_dir), "--hold-time", "3600",
                   "--config", "/dev/null"]
        env = {**os.environ, "PYTHONPATH": str(self.source)}
        with self.uenvfs_log.open("ab") as log:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True, env=env)
        self.uenvfs = process
        self.stack.callback(self.stop_uenvfs, process)
        wait_for(lambda: self.up(process, mountpoint, "uenvfs") and self.uenvfs_serving(),
                 READY_TIMEOUT, f"uenvfs on {mountpoint}")

    def uenvfs_serving(self) -> bool:
        return b" serving " in self.uenvfs_log.read_bytes()

    def up(self, process: subprocess.Popen[bytes], target: Path, what: str) -> bool:
        if process.poll() is not None:
            raise BenchError(f"{what} exited {process.returncode} before mounting {target} "
                             f"(see the logs in {self.run_dir})")
        return is_mounted(target, "fuse")

    def stop_uenvfs(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM: uenvfs unmounts its idle backing mounts and its FUSE mount, and exits 0."""
        if process.poll() is None:
            with contextlib.suppress(BenchError):
                self.wait_idle()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.problems.append(
                    f"uenvfs did not stop {STOP_TIMEOUT:g} s after SIGTERM; killed")
                process.kill()
                process.wait()
        if process.returncode != 0:
            self.problems.append(
                f"uenvfs serve exited {process.returncode} (log: {self.uenvfs_log})")
        if is_mounted(self.fuse_mountpoint):
            self.problems.append("uenvfs left its FUSE mount behind; unmounted lazily")
            attempt(["umount", "-l", str(self.fuse_mountpoint)])
        bad = [line for line in self.uenvfs_log.read_text(errors="replace").splitlines()
               if any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Traceback"))]
        if bad:
            self.notes.append(f"uenvfs logged {len(bad)} warnings or errors, first: {bad[0]} "
                              f"(log: {self.uenvfs_log})")

    def uenvfs_refcounts(self) -> dict[str, int]:
        """Each mounted image's refcount, from .status (read by a child that a hang can't stop)."""
        try:
            done = subprocess.run(["cat", str(self.fuse_mountpoint / ".status")],
                                  capture_output=True, timeout=10, check=True)
        except (subprocess.SubprocessError, OSError) as exc:
            raise BenchError(f"cannot read uenvfs's .status: {exc}") from exc
        status = json.loads(done.stdout)
        return {mount["name"]: mount["refcount"] for mount in status["mounts"]}

    def wait_idle(self) -> None:
        """Wait until uenvfs counts no user: the kernel sends the last processes' releases
        asynchronously, after they exited."""
        wait_for(lambda: not any(self.uenvfs_refcounts().values()), 30.0,
                 "uenvfs to see every file closed (refcount 0)")

    def uenvfs_pid(self) -> int:
        """The process that answers FUSE requests: the server (`.status` names it), not the
        keeper that `uenvfs serve` runs as; a uenvfs without one is a single process."""
        assert self.uenvfs is not None
        status = json.loads((self.fuse_mountpoint / ".status").read_bytes())
        server = status.get("server")
        return int(server["pid"]) if server else self.uenvfs.pid

    def uenvfs_backend(self) -> str:
        for line in self.uenvfs_log.read_text(errors="replace").splitlines():
            if " serving " in line and "backend " in line:
                return line.split("backend ", 1)[1].split(",")[0]
        return "unknown"

    def expire(self, name: str) -> None:
        """Make uenvfs unmount *name* now (it has no user: the hold timer is all that keeps it)."""
        if not is_mounted(self.backing(name)):
            return
        self.wait_idle()
        try:
            (self.fuse_mountpoint / ".control").write_text(f"expire {name}\n")
        except OSError as exc:
            raise BenchError(f"uenvfs refused `expire {name}`: {exc}") from exc
        wait_for(lambda: not is_mounted(self.backing(name)), 10.0, f"uenvfs to unmount {name}")


# -- images ----------------------------------------------------------------------------------


def ensure_images(settings: Settings) -> dict[str, Path]:
    """The images the chosen workloads need: cached ones as they are, missing ones built."""
    images = {}
    for name in settings.image_names():
        image = settings.images_dir / f"{name}.sqfs"
        if not image.exists():
            build_image(settings, name, image)
        images[name] = image
    return images


def build_image(settings: Settings, name: str, image: Path) -> None:
    src = settings.build_dir / name
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    started = time.monotonic()
    note(f"building the {name} image in {settings.images_dir} (done once, then reused)")
    if name == ENV_IMAGE:
        build_env_tree(src, settings.quick)
    else:
        build_data_tree(src, QUICK_DATA_SIZE if settings.quick else FULL_DATA_SIZE)
    files = count_files(src)
    if name == ENV_IMAGE and not settings.quick and files < MIN_ENV_FILES:
        raise BenchError(f"the Python environment has only {files} files, "
                         f"fewer than {MIN_ENV_FILES}: install more packages in the venv")
    partial = settings.build_dir / f"{name}.sqfs.partial"
    run(["mksquashfs", str(src), str(partial), "-comp", "gzip", "-noappend", "-no-progress",
         "-quiet"])
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    partial.replace(image)
    shutil.rmtree(src)
    note(f"built {image} ({files} files, {image.stat().st_size / MIB:.0f} MiB) in "
         f"{time.monotonic() - started:.0f} s")


def library_dirs() -> tuple[Path, Path]:
    """This interpreter's standard library and the site-packages of its (virtual) environment."""
    paths = sysconfig.get_paths()
    return Path(paths["stdlib"]), Path(paths["purelib"])


def build_env_tree(src: Path, quick: bool) -> None:
    """env/lib/pythonX.Y: all of the standard library and site-packages, or (quick) just the
    files the import set loads."""
    lib = src / ENV_LIB
    stdlib, purelib = library_dirs()
    if quick:
        for path in import_closure():
            copy_into_tree(path, lib, stdlib, purelib)
        (lib / "lib-dynload").mkdir(parents=True, exist_ok=True)
        return

    def skip_site_packages(directory: str, names: list[str]) -> set[str]:
        return {"site-packages"} if Path(directory) == stdlib else set()

    shutil.copytree(stdlib, lib, symlinks=True, ignore=skip_site_packages)
    shutil.copytree(purelib, lib / "site-packages", symlinks=True, dirs_exist_ok=True)


def import_closure() -> list[Path]:
    """Every module file (source and cached bytecode) the import set loads here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(library_dirs()[1])
    out = run([str(interpreter()), "-S", "-c", IMPORT_CODE, "/", "--list"], env=env)
    return sorted({Path(line) for line in out.splitlines() if line})


def copy_into_tree(path: Path, lib: Path, stdlib: Path, purelib: Path) -> None:
    if path.is_relative_to(purelib):
        target = lib / "site-packages" / path.relative_to(purelib)
    elif path.is_relative_to(stdlib):
        target = lib / path.relative_to(stdlib)
    else:
        return
    if path.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)  # keeps mtimes, so that the cached bytecode stays valid


def build_data_tree(src: Path, size: int) -> None:
    with (src / "random.bin").open("wb") as out:
        for _ in range(size // MIB):
            out.write(os.urandom(MIB))
    write_text(src / "text.txt", size)


def write_text(path: Path, size: int) -> None:
    """*size* bytes of text: lines of words drawn with a Zipf-like law from a made-up
    vocabulary; up to 64 different 1 MiB chunks in a random order, so that neighbouring
    blocks differ."""
    rng = random.Random(20261130)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 11)))
                  for _ in range(4000)]
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(vocabulary))))
    chunks = []
    for _ in range(max(1, min(64, size // MIB // 4))):
        chunk = b""
        while len(chunk) < MIB:
            words = rng.choices(vocabulary, cum_weights=cumulative, k=12 * 1024)
            chunk += "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)).encode()
            chunk += b"\n"
        chunks.append(chunk[:MIB - 1] + b"\n")
    with path.open("wb") as out:
        for _ in range(size // MIB):
            out.write(rng.choice(chunks))


def interpreter() -> Path:
    """The real interpreter binary behind this (virtual environment's) python."""
    return Path(os.path.realpath(sys.executable))


def python_env(root: Path) -> dict[str, str]:
    """Environment for the interpreter to take all of its modules from the image at *root*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONHOME"] = str(root / "env")
    env["PYTHONPATH"] = str(root / ENV_LIB / "site-packages")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# -- workloads -------------------------------------------------------------------------------

Sample = tuple[float, str]  # seconds, and output that must be the same on every mount


@dataclass
class Bench:
    settings: Settings
    mounts: Mounts
    storm_files: list[str] = field(default_factory=list)

    def root(self, system: str, name: str = ENV_IMAGE) -> Path:
        return self.mounts.root(system, name)


def timed_shell(script: str, env: dict[str, str] | None = None) -> Sample:
    start = time.perf_counter()
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"`{script}` failed (exit {done.returncode}): "
                         f"{done.stderr.strip()[-2000:]}")
    return elapsed, done.stdout.strip()


def find_script(root: Path) -> str:
    return f"find {shlex.quote(str(root))} -type f | wc -l"


def stat_script(root: Path) -> str:
    return f"find {shlex.quote(str(root))} -printf '%s\\n' | wc -l"


def read_script(root: Path) -> str:
    return f"find {shlex.quote(str(root))} -type f -print0 | xargs -0 cat > /dev/null"


def import_script(root: Path) -> str:
    """The import set, to run with python_env(root)."""
    return shlex.join([str(interpreter()), "-S", "-c", IMPORT_CODE, str(root)])


def find_walk(bench: Bench, system: str, cold: bool) -> Sample:
    return timed_shell(find_script(bench.root(system)))


def stat_walk(bench: Bench, system: str, cold: bool) -> Sample:
    return timed_shell(stat_script(bench.root(system)))


def read_all(bench: Bench, system: str, cold: bool) -> Sample:
    return timed_shell(read_script(bench.root(system)))


def import_set(bench: Bench, system: str, cold: bool) -> Sample:
    root = bench.root(system)
    return timed_shell(import_script(root), env=python_env(root))


def read_file(bench: Bench, system: str, name: str) -> Sample:
    path = shlex.quote(str(bench.root(system, DATA_IMAGE) / name))
    return timed_shell(f"dd if={path} of=/dev/null bs=1M status=none")


def seq_random(bench: Bench, system: str, cold: bool) -> Sample:
    return read_file(bench, system, "random.bin")


def seq_text(bench: Bench, system: str, cold: bool) -> Sample:
    return read_file(bench, system, "text.txt")


def concurrent(bench: Bench, system: str, cold: bool) -> Sample:
    first, second = (shlex.quote(str(bench.root(system, DATA_IMAGE) / f)) for f in DATA_FILES)
    return timed_shell(f"dd if={first} of=/dev/null bs=1M status=none & a=$!; "
                       f"dd if={second} of=/dev/null bs=1M status=none & b=$!; "
                       "wait $a && wait $b")


def storm(bench: Bench, system: str, cold: bool) -> Sample:
    """Job processes (64, or 16 with --quick) start at once and each reads the same 200 files
    of the environment, as the ranks of a job starting on a node do."""
    root = bench.root(system)
    command = ["cat", *bench.storm_files]
    start = time.perf_counter()
    processes = [subprocess.Popen(command, cwd=root, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for _ in range(bench.settings.storm_processes)]
    errors = [process.communicate()[1] for process in processes]
    elapsed = time.perf_counter() - start
    failed = [error for process, error in zip(processes, errors, strict=True)
              if process.returncode != 0]
    if failed:
        raise BenchError(f"{len(failed)} storm readers failed on {system}: {failed[0]!r}")
    return elapsed, ""


def trigger(bench: Bench, system: str, cold: bool) -> Sample:
    """Mount + first stat, each from scratch (uenvfs: `expire`, then its lazy mount)."""
    mounts = bench.mounts
    image = mounts.images[ENV_IMAGE]
    if system == "uenvfs":
        mounts.expire(ENV_IMAGE)
        target, command = bench.root(system), []
    else:
        target = mounts.run_dir / "trigger" / system
        target.mkdir(parents=True, exist_ok=True)
        command = mount_command(system, image, target)
    drop_caches(3 if cold else 2)  # 2 at least: no cached dentry may answer the stat
    try:
        seconds = first_stat(command, target / TRIGGER_FILE)
    finally:
        if command:
            unmount(system, target)
    if system == "uenvfs" and not is_mounted(mounts.backing(ENV_IMAGE)):
        raise BenchError("the stat through uenvfs did not mount the image: a cached answer?")
    return seconds, ""


def first_stat(mount: list[str], path: Path) -> float:
    out = run([sys.executable, "-I", "-c", TRIGGER_CODE, str(path), *mount])
    return float(out.strip())


@dataclass(frozen=True)
class Workload:
    name: str  # as in --only
    label: str
    action: Callable[[Bench, str, bool], Sample]
    phases: tuple[str, ...] = ("warm", "cold")
    drops: bool = True  # drop caches before each cold run (otherwise the action does)


TIMED = (
    Workload("find", "find", find_walk),
    Workload("stat", "stat", stat_walk),
    Workload("read", "read-all", read_all),
    Workload("import", "import", import_set),
    Workload("seq", "seq-random", seq_random),
    Workload("seq", "seq-text", seq_text),
    Workload("concurrent", "concurrent", concurrent),
    Workload("trigger", "trigger", trigger, drops=False),
    Workload("storm", "storm", storm, phases=("warm",)),
)


def run_timed(bench: Bench, workload: Workload) -> list[Row]:
    """Every phase of *workload*, the mounts taking turns in each repetition."""
    rows = []
    for phase in workload.phases:
        cold = phase == "cold"
        outputs: dict[str, str] = {}
        if not cold:
            for system in SYSTEMS:
                outputs[system] = workload.action(bench, system, False)[1]
        runs: dict[str, list[float]] = {system: [] for system in SYSTEMS}
        count = bench.settings.cold_runs if cold else bench.settings.warm_runs
        for _ in range(count):
            for system in SYSTEMS:
                if cold and workload.drops:
                    drop_caches(3)
                seconds, output = workload.action(bench, system, cold)
                runs[system].append(seconds)
                outputs.setdefault(system, output)
        check_same(workload.label, outputs)
        rows.append(Row(f"{workload.label}/{phase}", "s", runs))
        progress(rows[-1])
    return rows


def job_workloads(bench: Bench) -> tuple[JobWorkload, ...]:
    """The workloads of the rows above, as a job runs them (scripts/runrows.py)."""
    storm_job = Job(storm=tuple(bench.storm_files), processes=bench.settings.storm_processes)
    return (
        JobWorkload("find", lambda root: Job(find_script(root))),
        JobWorkload("stat", lambda root: Job(stat_script(root))),
        JobWorkload("read-all", lambda root: Job(read_script(root))),
        JobWorkload("import", lambda root: Job(import_script(root), python_env(root))),
        JobWorkload("storm", lambda root: storm_job, phases=("warm",)),
    )


def job_places(bench: Bench) -> dict[str, Place]:
    """The kernel's own mount, uenvfs's FUSE mount, and a job started with `uenvfs run`."""
    mounts = bench.mounts
    return {
        "kernel": Place("kernel", bench.root("kernel"), "squashfs"),
        "uenvfs": Place("uenvfs", bench.root("uenvfs"), "fuse.uenvfs"),
        "run": job_place(sys.executable, mounts.fuse_mountpoint, ENV_IMAGE, mounts.job_root,
                         mounts.source, mounts.backing(ENV_IMAGE)),
    }


def measure_jobs(bench: Bench) -> list[Row]:
    """Jobs started with `uenvfs run` against the kernel mount (--only run), and the server's
    CPU per file access through FUSE and in a job (--only cpu)."""
    places = job_places(bench)
    pid, settings = bench.mounts.uenvfs_pid(), bench.settings
    rows = []
    if "run" in settings.only:
        rows += runrows.measure(job_workloads(bench), [places["kernel"], places["run"]],
                                interpreter(), pid, settings.warm_runs, settings.cold_runs)
    if "cpu" in settings.only:
        files = count_files(bench.root("kernel"))
        rows.append(runrows.measure_cpu(lambda root: Job(read_script(root)),
                                        [places["uenvfs"], places["run"]], files,
                                        interpreter(), pid, settings.warm_runs))
    return rows


def measure_rss(bench: Bench) -> list[Row]:
    """Daemon VmRSS: idle, after a stat walk of every inode, and after the kernel dropped its
    dentries and inodes (FORGET) and a second walk. The kernel mount has no daemon."""
    pids = {"squashfuse_ll": bench.mounts.squashfuse[ENV_IMAGE].pid,
            "uenvfs": bench.mounts.uenvfs_pid()}
    idle = {system: [rss_mib(pid)] for system, pid in pids.items()}
    walked: dict[str, list[float]] = {system: [] for system in pids}
    dropped: dict[str, list[float]] = {system: [] for system in pids}
    for _ in range(bench.settings.warm_runs):
        for system, pid in pids.items():
            stat_walk(bench, system, False)
            walked[system].append(rss_mib(pid))
            drop_caches(2)
            stat_walk(bench, system, False)
            dropped[system].append(rss_mib(pid))
    rows = [Row("rss/idle", "MiB", idle), Row("rss/walk", "MiB", walked),
            Row("rss/after-drop", "MiB", dropped)]
    for row in rows:
        progress(row)
    return rows


def run_workloads(bench: Bench) -> list[Row]:
    rows = []
    if "rss" in bench.settings.only:
        rows += measure_rss(bench)
    for workload in TIMED:
        if workload.name in bench.settings.only:
            rows += run_timed(bench, workload)
    if {"run", "cpu"} & set(bench.settings.only):
        rows += measure_jobs(bench)
    return rows


def prepare_env_image(bench: Bench) -> dict[str, Any]:
    """Check the environment image on the kernel mount and choose the storm's files."""
    root = bench.root("kernel")
    files = count_files(root)
    if not bench.settings.quick and files < MIN_ENV_FILES:
        raise BenchError(f"{bench.mounts.images[ENV_IMAGE]} holds {files} files, fewer than "
                         f"{MIN_ENV_FILES}: delete it to rebuild it")
    out = run([str(interpreter()), "-S", "-c", IMPORT_CODE, str(root), "--list"],
              env=python_env(root))
    loaded = sorted({Path(line).relative_to(root).as_posix() for line in out.splitlines()
                     if line and (root / line).is_file()})
    cached = [path for path in loaded if path.endswith(".pyc")] or loaded
    bench.storm_files = (cached * STORM_FILES)[:STORM_FILES]
    return {"files": files, "storm_files": len(set(bench.storm_files))}


# -- the report ------------------------------------------------------------------------------


def machine(source: Path = REPO) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "python": platform.python_version(),
        "interpreter": str(interpreter()),
        "pyfuse3": importlib.metadata.version("pyfuse3"),
        "trio": importlib.metadata.version("trio"),
        "squashfuse": tool_version(["squashfuse_ll", "--version"]),
        "mksquashfs": tool_version(["mksquashfs", "-version"]),
        "libfuse": tool_version(["fusermount3", "-V"]),
        "uenvfs_commit": git_label(source, "unknown"),
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def tool_version(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = re.search(r"\b\d+\.\d+(\.\d+)*\b", done.stdout + done.stderr)
    return found.group(0) if found else "unknown"


# -- main ------------------------------------------------------------------------------------


def check_machine() -> None:
    if os.geteuid() != 0:
        raise BenchError("run me as root (kernel loop mounts, drop_caches, FUSE allow_other)")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse is missing")
    tools = ["mksquashfs", "squashfuse_ll", "fusermount3", "mount", "umount", "losetup", "find",
             "xargs", "dd", "cat"]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (scripts/setup installs them)")
    if not (Path(sys.executable).parent / "uenvfs").exists():
        raise BenchError(f"no uenvfs next to {sys.executable}: run scripts/setup")


def prepare_workdir(settings: Settings) -> None:
    settings.workdir.mkdir(parents=True, exist_ok=True)
    found = clean_up(settings.workdir)
    if found:
        note("cleared what an earlier run left behind: " + ", ".join(found))
    if mounts_under(settings.run_dir):
        raise BenchError(f"cannot clear the mounts under {settings.run_dir}")
    shutil.rmtree(settings.run_dir, ignore_errors=True)
    settings.run_dir.mkdir(parents=True)


def benchmark(settings: Settings) -> tuple[list[Row], dict[str, Any]]:
    """Build, mount, measure, and always take every mount down again."""
    prepare_workdir(settings)
    images = ensure_images(settings)
    stack = contextlib.ExitStack()
    mounts = Mounts(settings.run_dir, settings.images_dir, images, stack,
                    source=settings.source)
    info: dict[str, Any] = {"machine": machine(settings.source), "problems": mounts.problems,
                            "notes": mounts.notes}
    try:
        mounts.mount_all()
        bench = Bench(settings, mounts)
        info["images"] = check_images(bench)
        info["settings"] = describe_settings(settings, mounts)
        rows = run_workloads(bench)
    finally:
        with uninterruptible():
            try:
                stack.close()
            finally:
                found = leftovers(settings.workdir)
                if found:
                    clean_up(settings.workdir)
                    mounts.problems.append("left behind, cleared lazily: " + ", ".join(found))
                for line in mounts.notes + mounts.problems:
                    note(line)
    return rows, info


def check_images(bench: Bench) -> dict[str, Any]:
    """Describe each mounted image; check the environment and choose the storm's files."""
    described = {}
    for name, image in bench.mounts.images.items():
        if name == ENV_IMAGE:
            extra = prepare_env_image(bench)
        else:
            extra = {"files": count_files(bench.root("kernel", name))}
        described[name] = {"path": str(image), "mib": image.stat().st_size / MIB,
                           "tree_mib": tree_bytes(bench.root("kernel", name)) / MIB, **extra}
    return described


def describe_settings(settings: Settings, mounts: Mounts) -> dict[str, Any]:
    return {"quick": settings.quick, "only": list(settings.only),
            "warm_runs": settings.warm_runs, "cold_runs": settings.cold_runs,
            "workdir": str(settings.workdir), "import_set": list(IMPORTS),
            "storm": f"{settings.storm_processes} x cat of {STORM_FILES} files",
            "uenvfs_backend": mounts.uenvfs_backend()}


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    try:
        check_machine()
        rows, info = benchmark(settings)
    except BenchError as exc:
        note(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        note("interrupted; every mount was taken down")
        return 130
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    write_json(settings.json_path, {**info, "results": {row.key: row.summary() for row in rows}})
    print(table(rows, info))
    print(f"\n{len(rows)} rows in {info['elapsed_s']:.0f} s; JSON: {settings.json_path}")
    return 1 if info["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
