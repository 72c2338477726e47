"""Mounts and loop devices under a directory: list them, wait for them, clear them all.

Shared by the tests (through tests/support.py) and scripts/bench.py, which both mount real
images and must leave nothing behind. Only the standard library and uenvfs's mountinfo parser:
the benchmark imports this without pytest.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uenvfs.kernel import mountinfo
from uenvfs.kernel.mountinfo import MountEntry

DEADLINE = 20.0


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = DEADLINE,
    what: str = "condition",
    error: type[Exception] = AssertionError,
) -> Any:
    """Poll *predicate* until it returns something true, and return that; after *timeout*
    seconds raise *error* (a failed test by default)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise error(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def _under(path: str, prefix: Path) -> bool:
    return path == str(prefix) or path.startswith(f"{prefix}/")


def mounts_under(prefix: Path) -> list[MountEntry]:
    """The mounts at or below *prefix*, parents before children."""
    return [e for e in mountinfo.read() if _under(e.mount_point, prefix)]


def is_mounted(path: Path, fstype: str = "") -> bool:
    """Whether a mount (of a type that starts with *fstype*) is at *path*."""
    return any(e.mount_point == str(path) and e.fstype.startswith(fstype)
               for e in mountinfo.read())


def loops_for(prefix: Path) -> list[str]:
    """Loop devices whose backing file lies under *prefix*."""
    out = subprocess.run(["losetup", "-a", "-n", "-l", "-O", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=False).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and _under(parts[1].strip(), prefix):
            found.append(parts[0])
    return found


def _attempt(command: list[str]) -> None:
    subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)


def clean_up(prefix: Path) -> list[str]:
    """Lazily unmount everything under *prefix* and detach its loop devices; what was there."""
    left = []
    for entry in reversed(mounts_under(prefix)):
        left.append(f"{entry.fstype} on {entry.mount_point}")
        _attempt(["umount", "-l", entry.mount_point])
    for device in loops_for(prefix):
        left.append(f"loop device {device}")
        _attempt(["losetup", "-d", device])
    return left
