#!/usr/bin/env python3
"""What one scan of the processes costs the daemon with many processes in many mount namespaces
that hold an image (issue 28).

Mounts a scratch image the daemon's way (`kernel/loop.py`, ro,nosuid,nodev on a loop device)
at a backing directory, then starts --processes sleeping processes, in three setups, one after
the other:

  none      all in this mount namespace (the daemon's: skipped), as a node without jobs in
            namespaces of their own;
  idle      in --namespaces mount namespaces (`unshare --mount`), --processes / --namespaces in
            each, none holding the image: every mount table is read, nothing found;
  holding   the same, each namespace with a bind of the backing mount (`mount --bind`, what
            `uenvfs run` makes of a tree handed out): every process of them is read and judged;
  kept      the same again, as the periodic scans see it: the namespaces' processes are those
            of the last scan, whose readings of them are taken again (`uses.KEPT`).

and times --rounds scans of each: the worker thread's part (`fuse/uses.py` `scan`: /proc
listed, working directories looked at, one mount table read per namespace, what /proc says of
each process in a namespace that holds an image) and the event loop's (`UseScanner.holdings`:
each process's allocation decided). Prints the median wall and CPU seconds (this thread's,
user + system) of each part.

    .venv/bin/python scripts/nsscan.py [--processes 2000] [--namespaces 200] [--rounds 10]

Needs root, loop devices and gensquashfs; kills what it started and leaves no mount behind.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar, cast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uenvfs.core.interfaces import ImageService  # noqa: E402
from uenvfs.core.model import InodePrefixes  # noqa: E402
from uenvfs.fuse import uses  # noqa: E402
from uenvfs.fuse.allocation import AllocationResolver  # noqa: E402
from uenvfs.fuse.inodes import InodeTable  # noqa: E402
from uenvfs.kernel import loop, procscan  # noqa: E402

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """*fn*() with the wall and CPU seconds (this thread's) it took."""
    wall, cpu = time.perf_counter(), time.thread_time()
    result = fn()
    return result, time.perf_counter() - wall, time.thread_time() - cpu


@contextmanager
def sleepers(count: int, per: int, wrap: str, env: dict[str, str]) -> Iterator[None]:
    """*count* groups of *per* sleeping processes, each group a session of its own: `sh -c`
    of *wrap* with `{inner}` replaced by a script that starts per - 1 sleepers, says so and
    becomes the last one. Waits until every process is there; kills each session, by its id,
    at the end."""
    groups: list[subprocess.Popen[bytes]] = []
    inner = " ".join(["sleep 3600 &"] * (per - 1)) + " echo; exec sleep 3600"
    try:
        for _ in range(count):
            groups.append(subprocess.Popen(
                ["sh", "-c", wrap.format(inner=inner)],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
                env=env, cwd="/"))
        for group in groups:
            assert group.stdout is not None
            if group.stdout.readline() != b"\n":
                raise SystemExit(f"a group of sleepers failed to start ({wrap!r})")
        yield
    finally:
        for group in groups:
            with suppress(ProcessLookupError):
                os.killpg(group.pid, signal.SIGKILL)
            group.wait()
            if group.stdout is not None:
                group.stdout.close()


def measure(rounds: int, dev: int, backing: dict[int, tuple[str, str]], reuse: bool,
            ) -> dict[str, Any]:
    """*rounds* scans, as the daemon's refresh makes them (*reuse*: with what the scan before
    each read of the namespaces' processes): medians of each part."""
    resolver = AllocationResolver()
    scanner = uses.UseScanner(Path(), InodeTable(InodePrefixes()), resolver,
                              cast(ImageService, None))
    rows: dict[str, list[float]] = {k: [] for k in ("wall", "cpu", "loop_wall", "loop_cpu")}
    found: uses.Scan | None = None
    holdings: uses.Holdings = {}
    known: uses.Readings = {}
    if reuse:
        first = uses.scan(dev, procscan.CWD_KINDS, resolver.read, backing)
        known = {(s.ino, s.pids): {pid: first.processes[pid] for pid in s.pids}
                 for s in first.namespaces}
    for _ in range(rounds):
        scan, wall, cpu = timed(lambda: uses.scan(dev, procscan.CWD_KINDS, resolver.read,
                                                  backing, known))
        holdings, loop_wall, loop_cpu = timed(functools.partial(scanner.holdings, scan))
        for key, value in zip(rows, (wall, cpu, loop_wall, loop_cpu), strict=True):
            rows[key].append(value)
        found = scan
    assert found is not None
    counted = sum(len(kinds.get(uses.NAMESPACE, ())) for users in holdings.values()
                  for kinds in users.values())
    return {"processes": sum(name.isdigit() for name in os.listdir("/proc")),
            "namespaces": len(found.namespaces),
            "counted": counted, **{k: statistics.median(v) for k, v in rows.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2000)
    parser.add_argument("--namespaces", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("nsscan needs root (loop mounts, mount namespaces)")
    per = args.processes // args.namespaces
    work = Path(tempfile.mkdtemp(prefix="uenvfs-nsscan-"))
    (work / "src/bin").mkdir(parents=True)
    (work / "src/bin/tool").write_text("hello\n")
    image, backing, target = work / "img.sqfs", work / "backing", work / "target"
    backing.mkdir()
    target.mkdir()
    subprocess.run(["gensquashfs", "-q", "-D", str(work / "src"), str(image)], check=True)
    loop.mount_image(image, backing)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PACT_ALLOCATION_ID": "job-1"}
    unshare = "exec unshare --mount --propagation private sh -c"
    holding = f"{unshare} 'mount --bind {backing} {target} && {{inner}}'"
    setups = {"none": ("{inner}", False), "idle": (f"{unshare} '{{inner}}'", False),
              "holding": (holding, False), "kept": (holding, True)}
    try:
        dev = os.stat(backing).st_dev
        known = {dev: ("img", str(backing))}
        print(f"{'setup':8} {'procs':>6} {'ns':>4} {'counted':>7} {'wall s':>8} {'cpu s':>8} "
              f"{'loop wall':>9} {'loop cpu':>9}")
        for name, (wrap, reuse) in setups.items():
            with sleepers(args.namespaces, per, wrap, env):
                row = measure(args.rounds, dev, known, reuse)
            print(f"{name:8} {row['processes']:>6} {row['namespaces']:>4} {row['counted']:>7} "
                  f"{row['wall']:>8.4f} {row['cpu']:>8.4f} {row['loop_wall']:>9.4f} "
                  f"{row['loop_cpu']:>9.4f}", flush=True)
    finally:
        loop.unmount(backing, lazy=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
