"""Uses that FUSE does not see: processes sitting in an image, mount namespaces holding one,
and a check of every count.

A process whose working directory (or root) is inside an image uses it, though it holds no
handle; so does a mount namespace with a mount of the image's backing mount in it (a bind, or a
tree handed out by the query socket and attached there), while any process is in it, though
none may ever send a request. `UseScanner` finds both with a scan of /proc (`procscan`, in a
worker thread, never asking this filesystem; no namespace is entered or held open) and hands
the counts to the manager (`ImageService.scanned`), which counts them as `cwd` and `namespaces`
uses of their allocations. It scans:

  - when `.status` or `.metrics` is read (a scan at most `FRESH` old: what the operator reads
    is right within a second of a `cd` in or out);
  - before the hold timer unmounts anything, and before a force-unmount: an image is never
    unmounted by its hold timer while a process sits in it or a namespace holds it;
  - every `rescan_every` seconds while such uses exist, to notice them end (the hold time
    starts then); not at all while none does.

`verify` compares every count of the daemon with a full scan (open files, mappings, running
programs, working directories, namespaces) and says what differs: `uenvfs status --verify`.

A scan costs the event loop one step per process and image, not per thread: the worker thread
that scans /proc keeps one hold per process, kind and image version (the threads of a process
that sit in one image are one use), reads the mount table of each mount namespace once, and
reads what /proc says of each process that holds any (`AllocationResolver.read`); the loop only
decides whose each process is.
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
from ..core.state import Scanned
from ..kernel import mountinfo, procscan
from ..kernel.procscan import Hold, Namespace
from .allocation import AllocationResolver, Process
from .inodes import InodeTable

log = logging.getLogger(__name__)

FRESH = 0.5  # seconds a scan answers `.status` and `.metrics`
RESCAN_MAX = 5.0  # seconds between scans while processes sit in images, at most
SCAN_TIMEOUT = 30.0  # seconds a scan may take before it is given up
SETTLE = 0.2  # seconds between the two scans of `verify` (a close reaches us just after)
KEPT = 30.0  # seconds what /proc says of a namespace's processes is reused while they stay
FILE_KINDS = frozenset({"fd", "map", "exe"})

NAMESPACE = "ns"  # the kind of a hold through a mount namespace: its "pids" are namespaces

# What the processes hold: image -> allocation -> kind -> the pids holding it that way (for
# NAMESPACE, the inode numbers of the mount namespaces holding it)
Holdings = dict[str, dict[str, dict[str, set[int]]]]
# What /proc said of the processes of a namespace: (its inode number, its pids) -> pid -> that
Readings = Mapping[tuple[int, tuple[int, ...]], Mapping[int, Process]]


@dataclass(frozen=True)
class Scan:
    """What a scan found: one hold per process, kind (`root` as `cwd`) and image version; the
    mount namespaces holding backing mounts (`devices`: device -> image), and what /proc says
    of each process holding any, or in such a namespace."""

    holds: list[Hold]
    processes: dict[int, Process]
    namespaces: list[Namespace] = field(default_factory=list)
    devices: dict[int, str] = field(default_factory=dict)


def scan(dev: int | None, kinds: Iterable[str], read: Callable[[int, int], Process],
         backing: Mapping[int, tuple[str, str]] | None = None, known: Readings | None = None,
         proc: bytes = b"/proc") -> Scan:
    """`procscan.scan` of the FUSE device *dev* (None: none), thread by thread, folded into one
    hold per process, kind and image version (an inode number's prefix: core/model.py); the
    namespaces holding a device of *backing* (device -> image, its backing mount point); and
    *read* of each process found, but for the processes of a namespace whose processes are
    the same as in *known*: what it says of them. *proc*: the /proc tree (a fake one in
    tests). For a worker thread: it takes as long as there are threads and mount
    namespaces."""
    holds: dict[tuple[int, str, int], Hold] = {}
    for hold in procscan.scan(dev, kinds, proc) if dev is not None else ():
        kind = "cwd" if hold.kind in procscan.CWD_KINDS else hold.kind
        holds.setdefault((hold.pid, kind, hold.ino >> PREFIX_SHIFT), hold)
    backing = backing or {}
    spaces = procscan.namespaces_holding({d: path for d, (_, path) in backing.items()}, proc)
    processes: dict[int, Process] = {}
    for hold in holds.values():
        if hold.uid >= 0 and hold.pid not in processes:
            processes[hold.pid] = read(hold.pid, hold.uid)
    for space in spaces:
        kept = (known or {}).get((space.ino, space.pids), {})
        for pid in space.pids:
            if pid in kept:
                processes.setdefault(pid, kept[pid])
            elif pid not in processes:
                processes[pid] = read(pid, -1)  # its uid from its status (-1: it is gone)
    return Scan(list(holds.values()), processes, spaces,
                {d: name for d, (name, _) in backing.items()})


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
    # Who holds each image through a mount namespace, as the last scan found: image ->
    # (allocation, the pids of the namespace), for the log of a force-unmount
    holders: dict[str, list[tuple[str, list[int]]]] = field(default_factory=dict)
    # What /proc said of the processes of each namespace holding an image, and when
    _readings: dict[tuple[int, tuple[int, ...]], tuple[float, dict[int, Process]]] = field(
        default_factory=dict)
    _scanned_at: float = -math.inf
    _lock: trio.Lock = field(default_factory=trio.Lock)

    def find_device(self) -> None:
        """Learn the device of the mount, from the mount table (once it is mounted, before it
        serves: it reads /proc only)."""
        self.dev = mountinfo.device_at(self.mountpoint)
        if self.dev is None:
            log.warning("cannot find %s in the mount table: working directories in images "
                        "are not counted", self.mountpoint)

    async def run(self) -> None:
        """Scan again and again while uses found by scanning exist, until cancelled."""
        while True:
            every = rescan_every(self.hold_time())
            await trio.sleep(every)
            if self.images.scanned_uses():
                await self.refresh(every / 2)

    async def refresh(self, max_age: float = 0.0) -> None:
        """Count the processes sitting in images and the namespaces holding them, unless a
        scan at most *max_age* old did."""
        async with self._lock:
            if time.monotonic() - self._scanned_at <= max_age:
                return
            started = time.monotonic()
            found = await self._scan(procscan.CWD_KINDS, reuse=True)
            if found is None:
                return
            self._scanned_at = started
            self.scans += 1
            self.scan_seconds = time.monotonic() - started
            self.images.scanned({
                image: {alloc: Scanned(len(kinds.get("cwd", ())), len(kinds.get(NAMESPACE, ())))
                        for alloc, kinds in users.items()}
                for image, users in self.holdings(found).items()})

    def disconnect(self) -> None:
        """The FUSE connection is gone: processes sitting in images no longer use it; the
        namespaces holding images still do (their mounts are the kernel's), and scans go on
        finding them."""
        self.dev = None
        self.images.disconnected()

    async def _scan(self, kinds: Iterable[str], reuse: bool = False) -> Scan | None:
        """`scan` in a worker thread; None if it takes over `SCAN_TIMEOUT` (it is left to
        finish; /proc answers unless the kernel itself is stuck). No thread when there is
        nothing to look for (no FUSE mount, no backing mount of a known device).

        With *reuse*, what /proc said of the processes of a namespace at most `KEPT` seconds
        ago is taken again while its processes are the same (same pids): a job's namespace
        costs the periodic scans one look at each process, not three reads of it. A process
        that changes its allocation meanwhile (an exec with another environment) counts for
        its new one within `KEPT` seconds, or at once when its namespace's processes change.
        """
        dev = self.dev
        backing = {m.device: (m.name, str(m.backing)) for m in self.images.serving()
                   if m.device}
        if dev is None and not backing:
            return Scan([], {})
        now = time.monotonic()
        known = {key: processes for key, (at, processes) in self._readings.items()
                 if reuse and now - at < KEPT}
        found = None
        with trio.move_on_after(SCAN_TIMEOUT):
            found = await trio.to_thread.run_sync(scan, dev, kinds, self.resolver.read,
                                                  backing, known, abandon_on_cancel=True)
        if found is None:
            log.warning("a scan of the processes took over %g s; given up", SCAN_TIMEOUT)
            return None
        readings = {}
        for space in found.namespaces:
            key = (space.ino, space.pids)
            readings[key] = self._readings[key] if key in known else (
                now, {pid: found.processes[pid] for pid in space.pids})
        self._readings = readings
        return found

    def holdings(self, found: Scan) -> Holdings:
        """The holds by image, allocation and kind (`root` counts as `cwd`; the namespaces of
        an allocation's processes holding the image as NAMESPACE); each process's allocation
        decided once. Keeps who holds each image through a namespace in `holders`."""
        holdings: Holdings = defaultdict(lambda: defaultdict(lambda: defaultdict(set)))
        allocs: dict[int, str] = {}

        def judge(pid: int) -> str:
            alloc = allocs.get(pid)
            if alloc is None:
                alloc = allocs[pid] = self.resolver.judge(found.processes[pid])
            return alloc

        for hold in found.holds:
            node = self.inodes.get(hold.ino)
            if node is None or hold.uid < 0:
                continue  # not an inode of an image the kernel knows, or the process is gone
            kind = "cwd" if hold.kind in procscan.CWD_KINDS else hold.kind
            holdings[node.image][judge(hold.pid)][kind].add(hold.pid)
        holders: dict[str, list[tuple[str, list[int]]]] = defaultdict(list)
        for space in found.namespaces:
            members: dict[str, list[int]] = defaultdict(list)
            for pid in space.pids:
                if found.processes[pid].uid >= 0:  # else gone
                    members[judge(pid)].append(pid)
            for image in sorted({found.devices[dev] for dev in space.devices}):
                for alloc, pids in members.items():
                    holdings[image][alloc][NAMESPACE].add(space.ino)
                    holders[image].append((alloc, pids))
        self.holders = dict(holders)
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
            use = counted.get(alloc, {"opens": 0, "cwd": 0, "namespaces": 0})
            kinds = held.get(alloc, {})
            pids = sorted(set().union(*(kinds[k] for k in FILE_KINDS & kinds.keys())))
            if use["opens"] and not pids:
                differences[name, alloc, "files"] = (
                    f"{name}: {alloc} is counted with {use['opens']} open file(s), but no "
                    f"process of {alloc} holds a file there")
            elif pids and not use["opens"]:
                how = ", ".join(sorted(FILE_KINDS & kinds.keys()))
                differences[name, alloc, "files"] = (
                    f"{name}: processes {few(pids)} of {alloc} hold files there ({how}), "
                    f"not counted for {alloc}")
            sitting = len(kinds.get("cwd", ()))
            if sitting != use.get("cwd", 0):
                differences[name, alloc, "cwd"] = (
                    f"{name}: {alloc} is counted with {use.get('cwd', 0)} process(es) "
                    f"sitting there, the processes say {sitting}")
            holding = len(kinds.get(NAMESPACE, ()))
            if holding != use.get("namespaces", 0):
                differences[name, alloc, "namespaces"] = (
                    f"{name}: {alloc} is counted with {use.get('namespaces', 0)} mount "
                    f"namespace(s) holding it, the processes say {holding}")
    return differences


def few(pids: list[int], most: int = 8) -> str:
    """*pids* as a log names them: at most *most*, and how many more."""
    shown = ",".join(map(str, pids[:most]))
    return shown + (f" and {len(pids) - most} more" if len(pids) > most else "")
