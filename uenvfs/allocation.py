"""Which job allocation a FUSE caller belongs to.

The allocation id comes, in this order, from the caller's cgroup (pact
`workload.slice/<id>.scope` → `<id>`, Slurm `job_<n>` → `slurm-<n>`), from its environment
(`PACT_ALLOCATION_ID`, then `SLURM_JOB_ID` → `slurm-<n>`), else `uid-<uid>`.

FUSE gives the caller's thread id. The answer is cached per thread together with a pidfd of
that thread: a cache hit costs one non-blocking poll and no /proc read, and a reused id is never
mistaken for the old process because the old thread's pidfd reports its exit.
"""

from __future__ import annotations

import logging
import os
import re
import select
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .names import valid_alloc

log = logging.getLogger(__name__)

_PACT_SCOPE = re.compile(r"^(?P<id>[^/\s]+)\.scope$")
_SLURM_JOB = re.compile(r"^job_(?P<n>\d+)$")
_SLURM_ID = re.compile(r"^\d+$")
RECHECK_AFTER = 0.05  # seconds during which a cached thread is trusted without a poll
PIDFD_THREAD = os.O_EXCL  # pidfd_open flag (Linux 6.9): a pidfd for one thread, not a process


def from_cgroup(text: str) -> str | None:
    """The allocation named by a `/proc/<pid>/cgroup` file, or None.

    The unified hierarchy (`0::`) is read first, then the v1 controllers in order.
    """
    lines = text.splitlines()
    lines.sort(key=lambda line: not line.startswith("0::"))
    for line in lines:
        path = line.split(":", 2)[-1]
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            if part == "workload.slice" and i + 1 < len(parts):
                m = _PACT_SCOPE.match(parts[i + 1])
                if m and valid_alloc(m["id"]):
                    return m["id"]
            m = _SLURM_JOB.match(part)
            if m:
                return f"slurm-{m['n']}"
    return None


def from_environ(env: Mapping[bytes, bytes]) -> str | None:
    """The allocation named by a process environment, or None."""
    pact = env.get(b"PACT_ALLOCATION_ID", b"").decode("utf-8", "replace").strip()
    if pact and valid_alloc(pact):
        return pact
    slurm = env.get(b"SLURM_JOB_ID", b"").decode("utf-8", "replace").strip()
    if _SLURM_ID.match(slurm):
        return f"slurm-{slurm}"
    return None


def parse_environ(data: bytes) -> dict[bytes, bytes]:
    env = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key] = value
    return env


def tgid_of(status: str) -> int | None:
    for line in status.splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    return None


@dataclass
class _Entry:
    alloc: str
    pidfd: int | None
    checked: float = 0.0  # when its pidfd last said the thread is alive


class AllocationResolver:
    """pid (thread id) → allocation id, cached per live thread.

    `proc` is the root of the /proc tree, so that tests can hand it a fake one.
    """

    def __init__(self, proc: Path = Path("/proc"), max_entries: int = 4096) -> None:
        self.proc = proc
        self.max_entries = max_entries
        self._cache: dict[int, _Entry] = {}
        self.lookups = 0  # /proc resolutions done, for tests and metrics

    def resolve(self, pid: int, uid: int) -> str:
        entry = self._cache.get(pid)
        if entry is not None:
            now = time.monotonic()
            # A thread seen alive this recently cannot have exited *and* had its id reused
            # by a new thread that already asks us something: that takes a whole pid cycle.
            if now - entry.checked < RECHECK_AFTER:
                return entry.alloc
            if entry.pidfd is not None and not _exited(entry.pidfd):
                entry.checked = now
                return entry.alloc
            self._forget(pid)
        alloc, _ = self._read(pid, uid)
        pidfd = self._pidfd(pid)
        if pidfd is not None:
            if len(self._cache) >= self.max_entries:
                self.sweep()
            self._cache[pid] = _Entry(alloc, pidfd, time.monotonic())
        return alloc

    def resolve_exec(self, pid: int, uid: int) -> tuple[str, bool]:
        """The allocation of a thread in the middle of an execve, and whether it is final.

        During execve its environment is still the old one, and it is about to change: nothing
        about this thread is cached. Only a cgroup answer is final; otherwise the caller asks
        again once the new program runs.
        """
        entry = self._cache.get(pid)
        if entry is not None:
            self._forget(pid)
        return self._read(pid, uid)

    def _read(self, pid: int, uid: int) -> tuple[str, bool]:
        """Read the allocation from /proc, and whether it came from the cgroup.

        Any unreadable part falls through to the next source.
        """
        self.lookups += 1
        base = self.proc / str(pid)
        try:
            alloc = from_cgroup((base / "cgroup").read_text())
            if alloc:
                return alloc, True
        except (OSError, UnicodeDecodeError):
            pass
        try:
            tgid = tgid_of((base / "status").read_text()) or pid
            alloc = from_environ(parse_environ((self.proc / str(tgid) / "environ").read_bytes()))
            if alloc:
                return alloc, False
        except (OSError, UnicodeDecodeError, ValueError):
            pass
        return f"uid-{uid}", False

    def _pidfd(self, pid: int) -> int | None:
        if self.proc != Path("/proc"):
            return None
        for flags in (PIDFD_THREAD, 0):
            try:
                return os.pidfd_open(pid, flags)
            except OSError:
                continue
        return None

    def _forget(self, pid: int) -> None:
        entry = self._cache.pop(pid)
        if entry.pidfd is not None:
            os.close(entry.pidfd)

    def sweep(self) -> int:
        """Drop the entries of threads that exited. Returns how many were dropped."""
        gone = [pid for pid, e in self._cache.items() if e.pidfd is None or _exited(e.pidfd)]
        for pid in gone:
            self._forget(pid)
        return len(gone)

    def close(self) -> None:
        for pid in list(self._cache):
            self._forget(pid)


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its thread or process has exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
