"""Uses that FUSE does not see: processes sitting in an image, and a check of every count.

A process whose working directory (or root) is inside an image uses it, though it holds no
handle. `UseScanner` finds such processes with a scan of /proc (`procscan`, in a worker thread,
never asking this filesystem) and hands the counts to the manager (`ImageService.sitting`),
which counts them as `cwd` uses of their allocations. It scans:

  - when `.status` or `.metrics` is read (a scan at most `FRESH` old: what the operator reads
    is right within a second of a `cd` in or out);
  - before the hold timer unmounts anything, and before a force-unmount: an image is never
    unmounted by its hold timer while a process sits in it;
  - every `rescan_every` seconds while processes sit in an image, to notice them leave (the
    hold time starts then); not at all while none does.

`verify` compares every count of the daemon with a full scan (open files, mappings, running
programs, working directories) and says what differs: `uenvfs status --verify`.

A scan costs the event loop one step per process and image, not per thread: the worker thread
that scans /proc keeps one hold per process, kind and image version (the threads of a process
that sit in one image are one use) and reads what /proc says of each process that holds any
(`AllocationResolver.read`); the loop only decides whose each process is.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..core.interfaces import ImageService
from ..core.model import PREFIX_SHIFT
from ..kernel import mountinfo, procscan
from ..kernel.procscan import Hold
from .allocation import AllocationResolver, Process
from .inodes import InodeTable

log = logging.getLogger(__name__)

FRESH = 0.5  # seconds a scan answers `.status` and `.metrics`
RESCAN_MAX = 5.0  # seconds between scans while processes sit in images, at most
SCAN_TIMEOUT = 30.0  # seconds a scan may take before it is given up
SETTLE = 0.2  # seconds between the two scans of `verify` (a close reaches us just after)
FILE_KINDS = frozenset({"fd", "map", "exe"})

# What the processes hold: image -> allocation -> kind -> the pids holding it that way
Holdings = dict[str, dict[str, dict[str, set[int]]]]


@dataclass(frozen=True)
class Scan:
    """What a scan found: one hold per process, kind (`root` as `cwd`) and image version, and
    what /proc says of each process holding any."""

    holds: list[Hold]
    processes: dict[int, Process]


def scan(dev: int, kinds: Iterable[str], read: Callable[[int, int], Process]) -> Scan:
    """`procscan.scan`, thread by thread, folded into one hold per process, kind and image
    version (an inode number's prefix: core/model.py), and *read* of each process found. For
    a worker thread: it takes as long as there are threads."""
    holds: dict[tuple[int, str, int], Hold] = {}
    for hold in procscan.scan(dev, kinds):
        kind = "cwd" if hold.kind in procscan.CWD_KINDS else hold.kind
        holds.setdefault((hold.pid, kind, hold.ino >> PREFIX_SHIFT), hold)
    processes: dict[int, Process] = {}
    for hold in holds.values():
        if hold.uid >= 0 and hold.pid not in processes:
            processes[hold.pid] = read(hold.pid, hold.uid)
    return Scan(list(holds.values()), processes)


def rescan_every(hold_time: float) -> float:
    """Seconds between scans while processes sit in images: half the hold time, within
    [0.5, RESCAN_MAX]."""
    return min(RESCAN_MAX, max(0.5, hold_time / 2))


@dataclass
class UseScanner:
    """The scans of the processes of the node, for the filesystem mounted at `mountpoint`."""

    mountpoint: Path
    inodes: InodeTable
    resolver: AllocationResolver
    images: ImageService
    hold_time: Callable[[], float] = lambda: 60.0
    dev: int | None = None  # the device of our FUSE mount, known once it is mounted
    scans: int = 0  # for metrics
    scan_seconds: float = 0.0  # of the last scan
    _scanned_at: float = -math.inf
    _sitting: bool = False  # the last scan found processes sitting in mounted images
    _lock: trio.Lock = field(default_factory=trio.Lock)

    def find_device(self) -> None:
        """Learn the device of the mount, from the mount table (once it is mounted, before it
        serves: it reads /proc only)."""
        self.dev = mountinfo.device_at(self.mountpoint)
        if self.dev is None:
            log.warning("cannot find %s in the mount table: working directories in images "
                        "are not counted", self.mountpoint)

    async def run(self) -> None:
        """Scan again and again while processes sit in images, until cancelled."""
        while True:
            every = rescan_every(self.hold_time())
            await trio.sleep(every)
            if self._sitting:
                await self.refresh(every / 2)

    async def refresh(self, max_age: float = 0.0) -> None:
        """Count the processes sitting in images, unless a scan at most *max_age* old did."""
        if self.dev is None:
            return
        async with self._lock:
            if time.monotonic() - self._scanned_at <= max_age:
                return
            started = time.monotonic()
            found = await self._scan(procscan.CWD_KINDS)
            if found is None:
                return
            self._scanned_at = started
            self.scans += 1
            self.scan_seconds = time.monotonic() - started
            counts = {image: {alloc: len(kinds["cwd"]) for alloc, kinds in users.items()}
                      for image, users in self.holdings(found).items()}
            self._sitting = self.images.sitting(counts)

    async def _scan(self, kinds: Iterable[str]) -> Scan | None:
        """`scan` in a worker thread; None if it takes over `SCAN_TIMEOUT` (it is left to
        finish; /proc answers unless the kernel itself is stuck). Nothing is held once the
        connection is gone (a shutdown during an await)."""
        dev = self.dev
        if dev is None:
            return Scan([], {})
        with trio.move_on_after(SCAN_TIMEOUT):
            return await trio.to_thread.run_sync(scan, dev, kinds, self.resolver.read,
                                                 abandon_on_cancel=True)
        log.warning("a scan of the processes took over %g s; given up", SCAN_TIMEOUT)
        return None

    def holdings(self, found: Scan) -> Holdings:
        """The holds by image, allocation and kind (`root` counts as `cwd`); each process's
        allocation decided once."""
        holdings: Holdings = defaultdict(lambda: defaultdict(lambda: defaultdict(set)))
        allocs: dict[int, str] = {}
        for hold in found.holds:
            node = self.inodes.get(hold.ino)
            if node is None or hold.uid < 0:
                continue  # not an inode of an image the kernel knows, or the process is gone
            alloc = allocs.get(hold.pid)
            if alloc is None:
                alloc = allocs[hold.pid] = self.resolver.judge(found.processes[hold.pid])
            kind = "cwd" if hold.kind in procscan.CWD_KINDS else hold.kind
            holdings[node.image][alloc][kind].add(hold.pid)
        return holdings

    async def verify(self) -> list[str]:
        """What differs between the daemon's counts and a full scan of the processes, as
        sentences; a difference must be there in two scans `SETTLE` apart (a handle closed
        during the first reaches the daemon just after)."""
        if self.dev is None:
            return [f"cannot find {self.mountpoint} in the mount table: nothing to compare"]
        await self.refresh()
        first = await self._compare()
        await trio.sleep(SETTLE)
        await self.refresh()
        second = await self._compare()
        if self.dev is None:
            return ["the filesystem stopped during the comparison: nothing to compare"]
        return [text for key, text in second.items() if key in first]

    async def _compare(self) -> dict[tuple[str, str, str], str]:
        found = await self._scan(procscan.ALL_KINDS)
        if found is None:
            return {("", "", "scan"): "the scan of the processes gave no answer"}
        return compare(self.images.status()["mounts"], self.holdings(found))


def compare(mounts: Iterable[Mapping[str, Any]],
            holdings: Holdings) -> dict[tuple[str, str, str], str]:
    """The differences between the `.status` entries of mounted images and what the
    processes hold, keyed by (image, allocation, what)."""
    differences: dict[tuple[str, str, str], str] = {}
    for mount in mounts:
        if mount["state"] not in ("mounted", "holding"):
            continue
        name = mount["name"]
        counted: Mapping[str, Mapping[str, Any]] = mount["allocations"]
        held = holdings.get(name, {})
        for alloc in sorted(set(counted) | set(held)):
            use = counted.get(alloc, {"opens": 0, "cwd": 0})
            kinds = held.get(alloc, {})
            pids = sorted(set().union(*(kinds[k] for k in FILE_KINDS & kinds.keys())))
            if use["opens"] and not pids:
                differences[name, alloc, "files"] = (
                    f"{name}: {alloc} is counted with {use['opens']} open file(s), but no "
                    f"process of {alloc} holds a file there")
            elif pids and not use["opens"]:
                how = ", ".join(sorted(FILE_KINDS & kinds.keys()))
                differences[name, alloc, "files"] = (
                    f"{name}: processes {_pids(pids)} of {alloc} hold files there ({how}), "
                    f"not counted for {alloc}")
            sitting = len(kinds.get("cwd", ()))
            if sitting != use.get("cwd", 0):
                differences[name, alloc, "cwd"] = (
                    f"{name}: {alloc} is counted with {use.get('cwd', 0)} process(es) "
                    f"sitting there, the processes say {sitting}")
    return differences


def _pids(pids: list[int]) -> str:
    shown = ",".join(map(str, pids[:8]))
    return shown + (f" and {len(pids) - 8} more" if len(pids) > 8 else "")
