"""scripts/bench.py's rows for jobs started with `uenvfs run` (issue 28), and the uenvfs
server's CPU time per 10,000 file accesses on both of a job's paths to its image.

`uenvfs run IMAGE:MOUNT -- COMMAND` binds the image's own kernel mount (uenvfs's backing
squashfs mount) at MOUNT in a mount namespace of the command's own, then execs the command:
the job's reads never reach uenvfs. Each workload here runs in such a job, as a job gets it:
the job's command is JOB_CODE, a small timer that first looks at what is at the root it was
given (the filesystem type, and for a job whether it is on the device of uenvfs's backing
mount: one superblock per image per node, not a copy and not the FUSE fallback; the table
says what it found, so that a --source checkout from before issue 28, whose `run` bound
uenvfs's directory, gives the before figures), reads the uenvfs server's CPU time
(/proc/PID/stat: user + system, all its threads), runs the workload (a shell script, or the
storm's processes), and reads the CPU time again. The baseline is the
same timer run directly on the kernel's own mount of the same image, the two taking turns in
each repetition. Starting the job (`uenvfs run` looking the image up, asking for its tree,
entering the namespace) is not timed: scripts/runcost.py measures that.

The server's CPU per 10,000 file accesses (one access: a file opened, read to its end and
closed) is measured with the read-all workload, through uenvfs's FUSE mount (the path of
`cd /run/pact/uenv/NAME`) and in a job: each run's server CPU seconds over the files it read.
The clock ticks of /proc (10 ms here) bound its resolution.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchrows import CPU_SYSTEMS, RUN_SYSTEMS, BenchError, Row, check_same, progress
from harness import CLOCK_TICKS, drop_caches

ROW_PREFIX = "run"  # the rows' prefix: run/find/warm, ...
ACCESSES = 10_000  # the server's CPU is given per this many file accesses

# The job's command, run by the interpreter with -I (so that the job's PYTHON* variables do
# not touch it). argv[1] is a JSON spec: root, fstype (what must be mounted there; "": say
# what is), device_of, cpu_pid, and either script and env (sh -c SCRIPT, its stdout the
# output) or storm and processes (that many `cat` of the storm's files at once, in root).
# Prints one JSON line: seconds, output, cpu_ticks, mounted (the filesystem type at root, and
# whether it is on the device of device_of).
JOB_CODE = r"""
import json, os, subprocess, sys, time
spec = json.loads(sys.argv[1])
root = spec["root"]
point, fstype = "", ""
for line in open("/proc/self/mountinfo"):
    mount, kind = line.split()[4], line.split(" - ")[1].split()[0]
    if (root == mount or root.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(point):
        point, fstype = mount, kind
if spec["fstype"] and fstype != spec["fstype"]:
    sys.exit(f"{root} is on {fstype or 'nothing'} at {point}, not on {spec['fstype']}")
mounted = fstype
if spec["device_of"]:
    same = os.stat(root).st_dev == os.stat(spec["device_of"]).st_dev
    mounted += " on uenvfs's backing mount" if same else ", not uenvfs's backing mount"

def server_cpu():
    fields = open(f"/proc/{spec['cpu_pid']}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])

before = server_cpu()
start = time.perf_counter()
if spec["storm"]:
    readers = [subprocess.Popen(["cat", *spec["storm"]], cwd=root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for _ in range(spec["processes"])]
    errors = [reader.communicate()[1] for reader in readers]
    failed = [error for reader, error in zip(readers, errors) if reader.returncode]
    if failed:
        sys.exit(f"{len(failed)} storm readers failed: {failed[0]!r}")
    output = ""
else:
    done = subprocess.run(["sh", "-c", spec["script"]], capture_output=True, text=True,
                          env=spec["env"], stdin=subprocess.DEVNULL)
    if done.returncode:
        sys.exit(f"`{spec['script']}` failed (exit {done.returncode}): {done.stderr[-2000:]}")
    output = done.stdout.strip()
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "output": output, "cpu_ticks": server_cpu() - before,
                  "mounted": mounted}))
"""


@dataclass(frozen=True)
class Job:
    """A workload as the timer runs it: a shell script (with *env*, else the timer's
    environment), or, with *processes*, a storm of that many `cat` of *storm* files."""

    script: str = ""
    env: dict[str, str] | None = None
    storm: tuple[str, ...] = ()
    processes: int = 0


@dataclass(frozen=True)
class JobWorkload:
    """A row's workload: *build* makes its Job for the image at a root."""

    label: str
    build: Callable[[Path], Job]
    phases: tuple[str, ...] = ("warm", "cold")


@dataclass(frozen=True)
class Place:
    """Where the timer runs a workload: the image is at *root*, on *fstype* ("": whatever
    is there, which the timer reports, with whether it is on the device of *device_of*), for
    a timer started under *prefix* (nothing, or `uenvfs run ... --`) with *env* (None: the
    benchmark's own)."""

    name: str
    root: Path
    fstype: str
    prefix: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    device_of: Path | None = None


@dataclass(frozen=True)
class Timing:
    seconds: float
    output: str
    server_cpu: float  # seconds
    mounted: str  # what the timer found at the root


def job_place(python: str, fuse_mountpoint: Path, image: str, mount: Path, source: Path,
              backing: Path) -> Place:
    """A job started with `uenvfs run IMAGE:MOUNT` of the uenvfs at *fuse_mountpoint*, by the
    code of the checkout *source* (run by *python*). Whatever that code binds at MOUNT is
    measured, and said: the image's backing mount (squashfs) since issue 28, uenvfs's own
    directory of it (fuse.uenvfs) before, for before/after figures with --source."""
    prefix = (python, "-m", "uenvfs", "run", "--mountpoint", str(fuse_mountpoint),
              f"{image}:{mount}", "--")
    env = {**os.environ, "PYTHONPATH": str(source)}
    return Place("run", mount, "", prefix, env, backing)


def timed(job: Job, place: Place, interpreter: Path, cpu_pid: int) -> Timing:
    """Run *job* at *place* once, timed inside by JOB_CODE."""
    spec = {"root": str(place.root), "fstype": place.fstype,
            "device_of": str(place.device_of or ""), "cpu_pid": cpu_pid,
            "script": job.script, "env": job.env, "storm": list(job.storm),
            "processes": job.processes}
    command = [*place.prefix, str(interpreter), "-I", "-c", JOB_CODE, json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=place.env,
                          stdin=subprocess.DEVNULL, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise BenchError(f"a job on {place.name} failed (exit {done.returncode}): "
                         f"{done.stderr.strip()[-2000:]}")
    result = json.loads(lines[-1])
    return Timing(float(result["seconds"]), str(result["output"]),
                  int(result["cpu_ticks"]) / CLOCK_TICKS, str(result["mounted"]))


def measure(workloads: Sequence[JobWorkload], places: Sequence[Place], interpreter: Path,
            cpu_pid: int, warm_runs: int, cold_runs: int) -> list[Row]:
    """A row per workload and phase: the places (the kernel mount, a job) take turns in each
    repetition; warm runs follow one untimed run, cold runs a drop of every cache."""
    rows = []
    for workload in workloads:
        for phase in workload.phases:
            cold = phase == "cold"
            outputs: dict[str, str] = {}
            if not cold:
                for place in places:
                    outputs[place.name] = timed(workload.build(place.root), place,
                                                interpreter, cpu_pid).output
            runs: dict[str, list[float]] = {place.name: [] for place in places}
            cpu: dict[str, list[float]] = {place.name: [] for place in places}
            mounted: dict[str, set[str]] = {place.name: set() for place in places}
            for _ in range(cold_runs if cold else warm_runs):
                for place in places:
                    if cold:
                        drop_caches(3)
                    timing = timed(workload.build(place.root), place, interpreter, cpu_pid)
                    runs[place.name].append(timing.seconds)
                    cpu[place.name].append(timing.server_cpu)
                    mounted[place.name].add(timing.mounted)
                    outputs.setdefault(place.name, timing.output)
            check_same(f"{ROW_PREFIX}/{workload.label}", outputs)
            row = Row(f"{ROW_PREFIX}/{workload.label}/{phase}", "s", runs, RUN_SYSTEMS, cpu,
                      {name: "; ".join(sorted(found)) for name, found in mounted.items()})
            progress(row)
            rows.append(row)
    return rows


def measure_cpu(read_all: Callable[[Path], Job], places: Sequence[Place], files: int,
                interpreter: Path, cpu_pid: int, runs: int) -> Row:
    """The server's CPU seconds per ACCESSES file accesses on each place (the FUSE mount, a
    job), from warm runs of *read_all* (which reads *files* files), after one untimed run."""
    names = [place.name for place in places]
    if names != list(CPU_SYSTEMS):
        raise BenchError(f"the server's CPU is measured on {CPU_SYSTEMS}, not {names}")
    per_access: dict[str, list[float]] = {name: [] for name in names}
    spent: dict[str, list[float]] = {name: [] for name in names}
    for place in places:
        timed(read_all(place.root), place, interpreter, cpu_pid)
    for _ in range(runs):
        for place in places:
            timing = timed(read_all(place.root), place, interpreter, cpu_pid)
            spent[place.name].append(timing.server_cpu)
            per_access[place.name].append(timing.server_cpu / files * ACCESSES)
    row = Row(f"cpu/{ACCESSES // 1000}k-accesses", "s", per_access, CPU_SYSTEMS, spent)
    progress(row)
    return row
