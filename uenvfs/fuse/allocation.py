"""Which job allocation a FUSE caller belongs to.

The allocation id comes, in this order, from the caller's cgroup (pact
`workload.slice/<id>.scope` → `<id>`, Slurm `job_<n>` → `slurm-<n>`), from its environment
(`PACT_ALLOCATION_ID`, then `SLURM_JOB_ID` → `slurm-<n>`), else `uid-<uid>`.

FUSE gives the caller's thread id. The answer is remembered per thread for a few
milliseconds: a burst of requests costs one /proc read, and a change of the thread's
allocation (an exec with another environment, a move to another cgroup) counts soon after.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from ..core.names import valid_alloc

log = logging.getLogger(__name__)

_PACT_SCOPE = re.compile(r"^(?P<id>[^/\s]+)\.scope$")
_SLURM_JOB = re.compile(r"^job_(?P<n>\d+)$")
_SLURM_ID = re.compile(r"^\d+$")
RECHECK_AFTER = 0.05  # seconds an answer is trusted without reading /proc again


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


class AllocationResolver:
    """pid (thread id) → allocation id, remembered for `RECHECK_AFTER` seconds per thread.

    Invariant: an answer is at most RECHECK_AFTER old. Within that time the thread cannot have
    exited and had its id reused by a new thread that already asks (that takes a whole pid
    cycle), and a burst of requests costs one /proc read. After it, /proc is read again, so
    an `exec env PACT_ALLOCATION_ID=...` or a move to another cgroup counts from then on.
    The cache holds no descriptor, and dropping what is too old costs O(1) per request.
    `proc` is the root of the /proc tree, so that tests can hand it a fake one.
    """

    def __init__(self, proc: Path = Path("/proc"), max_entries: int = 4096) -> None:
        self.proc = proc
        self.max_entries = max_entries
        # pid → (alloc, when read), oldest first: reading again moves an entry to the end.
        self._cache: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self.lookups = 0  # /proc resolutions done, for tests and metrics

    def resolve(self, pid: int, uid: int) -> str:
        entry = self._cache.get(pid)
        now = time.monotonic()
        if entry is not None and now - entry[1] < RECHECK_AFTER:
            return entry[0]
        alloc, _ = self._read(pid, uid)
        cache = self._cache
        cache[pid] = (alloc, now)
        cache.move_to_end(pid)
        while len(cache) > self.max_entries:
            cache.popitem(last=False)
        return alloc

    def resolve_exec(self, pid: int, uid: int) -> tuple[str, bool]:
        """The allocation of a thread in the middle of an execve, and whether it is final.

        During execve its environment is still the old one, and it is about to change: nothing
        about this thread is cached. Only a cgroup answer is final; otherwise the caller asks
        again once the new program runs.
        """
        self._cache.pop(pid, None)
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

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.clear()
