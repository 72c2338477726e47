"""A memory cgroup of our own, for a daemon to run in under a memory limit.

Shared by the tests (tests/mount/test_bounds.py) and scripts/hostile.py. Only the standard
library: the script imports this without pytest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MemoryGroup:
    """A memory cgroup of ours below our own (v1 `memory`, or v2 if it has the controller),
    limited to `limit` bytes; the daemon runs in it. Removed (its processes killed) at the end.
    """

    path: Path
    version: int

    @classmethod
    def create(cls, name: str, limit: int) -> MemoryGroup | None:
        for version, base in own_memory_cgroups():
            path = base / name
            try:
                path.mkdir()
            except OSError:
                continue
            group = cls(path, version)
            try:
                group.limit(limit)
            except OSError:
                group.remove()
                continue
            return group
        return None

    def limit(self, limit: int) -> None:
        """Limit the memory of its processes to *limit* bytes (OSError if it cannot be)."""
        knob = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        (self.path / knob).write_text(str(limit))

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def usage(self) -> int:
        """The bytes its processes use now (page cache included)."""
        knob = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int((self.path / knob).read_text())

    def peak(self) -> int | None:
        knob = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / knob).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int | None:
        knob = "memory.oom_control" if self.version == 1 else "memory.events"
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / knob).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return None

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.procs.read_text().split()]
        except (OSError, ValueError):
            return []

    def remove(self) -> bool:
        """Kill what is left in it (processes we started: the daemon's) and remove it."""
        for _ in range(50):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                time.sleep(0.1)
        return False


def own_memory_cgroups() -> list[tuple[int, Path]]:
    """Where a child of our own memory cgroup can be made: (version, directory)."""
    mounts: dict[str, tuple[int, Path]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            head, _, tail = line.partition(" - ")
            fields, extra = head.split(), tail.split()
            if len(extra) >= 3 and extra[0] == "cgroup" and "memory" in extra[2].split(","):
                mounts["v1"] = (1, Path(fields[4]))
            elif extra and extra[0] == "cgroup2":
                mounts.setdefault("v2", (2, Path(fields[4])))
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(",") and "v1" in mounts:
                found.append((1, mounts["v1"][1] / path.lstrip("/")))
            elif controllers == "" and "v2" in mounts:
                found.append((2, mounts["v2"][1] / path.lstrip("/")))
    return sorted(found)
