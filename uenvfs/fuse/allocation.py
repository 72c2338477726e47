"""Which job allocation a FUSE caller, or a process sitting in an image, belongs to.

The allocation is, in this order:

  1. the one its cgroup names at a configured layout (`cgroup_layouts`, core/cgroups.py): the
     resource manager put the process there. A process of a uid other than 0 seen there
     teaches the daemon that the allocation is that uid's (core/owners.py);
  2. the one its environment names (`PACT_ALLOCATION_ID`, then `SLURM_JOB_ID` as
     `slurm-<n>`): for root's processes as it is; for any other uid only if the daemon knows
     that allocation is that uid's. A process writes its own environment, so a name it
     chose costs nobody else anything;
  3. else `uid-<uid>`.

The uid is the process's real uid (its status), not the owner of /proc/<pid> (root for a process
that made itself non-dumpable), nor the effective one (a set-user-ID program runs with the
environment of whoever started it).

FUSE gives the caller's thread id. What /proc says of a process (`Process`) is read once per
process (thread group), not per thread, and kept for `RECHECK_AFTER`: a burst of requests, or
thousands of threads, cost one read of the process, and a change (an exec with another
environment, a move to another cgroup) counts soon after. A thread costs one small read of its
status (which process it is in), kept as long. The environment is read up to `ENVIRON_MAX`
bytes (a variable past that is not seen) and searched for the two names only. Whether the
reading is trusted is decided at each request, with the owners known then.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..core.cgroups import DEFAULT_LAYOUTS, Layout, allocation, parse_layouts
from ..core.names import valid_alloc
from ..core.owners import Owners

RECHECK_AFTER = 0.05  # seconds a reading is trusted without reading /proc again
ENVIRON_MAX = 256 * 1024  # bytes of a process's environment read; past them nothing is seen
STATUS_MAX = 4096  # bytes of /proc/<pid>/status read: Tgid and Uid come first
CGROUP_MAX = 64 * 1024  # bytes of /proc/<pid>/cgroup read (a line per hierarchy)
_SLURM_ID = re.compile(rb"[0-9]{1,20}")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Process:
    """What /proc says of one process: the allocation its cgroup names at a configured layout,
    the one its environment names (either may be None), and its real uid."""

    cgroup: str | None
    environ: str | None
    uid: int


def variable(environ: bytes, name: bytes) -> bytes | None:
    """The value of the first variable *name* of an environment block (`NAME=value` items,
    each ended by a NUL), as getenv finds it; None if it is not there, or cut off by the end of
    the block (a bounded read)."""
    key = name + b"="
    if environ.startswith(key):
        start = len(key)
    else:
        at = environ.find(b"\0" + key)
        if at < 0:
            return None
        start = at + 1 + len(key)
    end = environ.find(b"\0", start)
    return None if end < 0 else environ[start:end]


def from_environ(environ: bytes) -> str | None:
    """The allocation an environment block names, or None."""
    pact = variable(environ, b"PACT_ALLOCATION_ID")
    if pact:
        alloc = pact.decode("utf-8", "replace").strip()
        if valid_alloc(alloc):
            return alloc
    slurm = (variable(environ, b"SLURM_JOB_ID") or b"").strip()
    if _SLURM_ID.fullmatch(slurm):
        return f"slurm-{slurm.decode()}"
    return None


def from_status(status: bytes) -> tuple[int | None, int | None]:
    """The thread group id and real uid of a `/proc/<pid>/status` text (None if missing)."""
    tgid = uid = None
    for line in status.splitlines():
        if line.startswith(b"Tgid:"):
            tgid = int(line.split()[1])
        elif line.startswith(b"Uid:"):
            uid = int(line.split()[1])
            break  # after Tgid
    return tgid, uid


def read_bounded(path: str, limit: int) -> bytes:
    """At most *limit* bytes of the file at *path*."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class AllocationResolver:
    """Thread or process id -> allocation id, with what /proc says of each process kept for
    `RECHECK_AFTER` seconds.

    Invariants: a reading of a process, and which process a thread is in, are at most
    RECHECK_AFTER old when used: within that time a pid cannot have been reused by a new
    process or thread that already asks (that takes a whole pid cycle). Each of the two caches
    holds at most `max_entries`, the oldest dropped first (O(1) per request), and no
    descriptor. Trust is decided at each request, from the reading, its uid and the owners
    known then, so an `acquire NAME ALLOC UID` counts at once. `read` touches no state: the
    scan calls it in a worker thread. `proc` is the root of the /proc tree, so that tests can
    hand it a fake one.
    """

    def __init__(
        self,
        proc: Path = Path("/proc"),
        layouts: Sequence[Layout] | None = None,
        owners: Owners | None = None,
        max_entries: int = 4096,
    ) -> None:
        self._root = str(proc)
        self.layouts = tuple(parse_layouts(DEFAULT_LAYOUTS) if layouts is None else layouts)
        # The daemon's are the manager's (kept for the allocations in use); without, a map of
        # its own that nothing keeps in use (tests).
        self.owners = owners if owners is not None else Owners(frozenset)
        self.max_entries = max_entries
        # pid -> (reading, when read); thread id -> (its process's pid, its uid, when read).
        # Oldest first: reading again moves an entry to the end.
        self._processes: OrderedDict[int, tuple[Process, float]] = OrderedDict()
        self._threads: OrderedDict[int, tuple[int, int, float]] = OrderedDict()
        self.lookups = 0  # readings of a process's identity, for tests and .metrics

    def resolve(self, tid: int, uid: int) -> str:
        """The allocation of thread *tid* (a FUSE caller; *uid* as FUSE says, used if its
        status cannot be read)."""
        now = time.monotonic()
        process = self._fresh(tid, now)  # the main thread of a process read lately
        if process is not None:
            return self._decide(process)
        thread = self._threads.get(tid)
        if thread is not None and now - thread[2] < RECHECK_AFTER:
            pid, uid = thread[0], thread[1]
        else:
            tgid, real = self._status(tid)
            uid = uid if real is None else real
            pid = tid if tgid is None else tgid
            if pid != tid:
                self._threads[tid] = (pid, uid, now)
                self._threads.move_to_end(tid)
                _trim(self._threads, self.max_entries)
        process = self._fresh(pid, now)
        if process is None:
            # The threads of a process share their uids (glibc keeps them so): the status of
            # the thread that asked tells the process's.
            process = self._remember(pid, self._look(pid, uid, status=False), now)
        return self._decide(process)

    def resolve_exec(self, tid: int, uid: int) -> tuple[str, bool]:
        """The allocation of a thread in the middle of an execve, and whether it is final.

        During execve its environment is still the old one, and it is about to change: nothing
        about its process is kept. Only a cgroup's answer is final; otherwise the caller asks
        again once the new program runs.
        """
        tgid, real = self._status(tid)
        pid = tid if tgid is None else tgid
        self._processes.pop(pid, None)
        self._threads.pop(tid, None)
        process = self._look(pid, uid if real is None else real, status=False)
        return self._decide(process), process.cgroup is not None

    def read(self, pid: int, uid: int, status: bool = True) -> Process:
        """What /proc says of process *pid*: its real uid from its status (*uid* if that
        cannot be read, or without *status*: known already), and what its cgroup and its
        environment name (nothing, where they cannot be read). Touches no state: for worker
        threads."""
        base = f"{self._root}/{pid}"
        if status:
            try:
                real = from_status(read_bounded(base + "/status", STATUS_MAX))[1]
            except (OSError, ValueError, IndexError):
                real = None
            uid = uid if real is None else real
        try:
            cgroup = allocation(read_bounded(base + "/cgroup", CGROUP_MAX).decode(
                "utf-8", "replace"), self.layouts)
        except OSError:
            cgroup = None
        try:
            environ = from_environ(read_bounded(base + "/environ", ENVIRON_MAX))
        except OSError:
            environ = None
        return Process(cgroup, environ, uid)

    def judge(self, process: Process) -> str:
        """The allocation of a process that `read` read (a scan's worker thread did)."""
        self._taken(process)
        return self._decide(process)

    def _look(self, pid: int, uid: int, status: bool = True) -> Process:
        process = self.read(pid, uid, status)
        self._taken(process)
        return process

    def _taken(self, process: Process) -> None:
        """Count a new reading, and learn what it teaches: the allocation its cgroup names is
        its uid's (unless root's: root's environment needs no owner)."""
        self.lookups += 1
        if process.cgroup is not None and process.uid != 0:
            self.owners.learn(process.cgroup, process.uid, "a process in its cgroup")

    def _decide(self, process: Process) -> str:
        if process.cgroup is not None:
            return process.cgroup
        named = process.environ
        if named is not None and (process.uid == 0 or self.owners.owner(named) == process.uid):
            return named
        return f"uid-{process.uid}"

    def _status(self, tid: int) -> tuple[int | None, int | None]:
        """The process (thread group) of thread *tid* and its real uid; None where unknown."""
        try:
            return from_status(read_bounded(f"{self._root}/{tid}/status", STATUS_MAX))
        except (OSError, ValueError, IndexError):
            return None, None

    def _fresh(self, pid: int, now: float) -> Process | None:
        """The reading of process *pid* if it is under RECHECK_AFTER old."""
        entry = self._processes.get(pid)
        return entry[0] if entry is not None and now - entry[1] < RECHECK_AFTER else None

    def _remember(self, pid: int, process: Process, now: float) -> Process:
        self._processes[pid] = (process, now)
        self._processes.move_to_end(pid)
        _trim(self._processes, self.max_entries)
        return process

    def __len__(self) -> int:
        return len(self._processes) + len(self._threads)

    def close(self) -> None:
        self._processes.clear()
        self._threads.clear()


def _trim(cache: OrderedDict[int, T], size: int) -> None:
    """Drop the oldest entries of *cache* beyond *size*."""
    while len(cache) > size:
        cache.popitem(last=False)
