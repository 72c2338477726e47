"""A fake mount backend for testing the manager's logic in virtual time (no real mounts)."""

from __future__ import annotations

from pathlib import Path

import trio

from uenvfs.core.errors import MountFailed, UnmountFailed


class FakeBackend:
    """Mounts are entries in a dict; each operation takes `delay` seconds of (virtual) time."""

    name = "fake"
    fstype = "fake"
    timeout = 30.0

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.table: dict[Path, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.broken: set[str] = set()  # image file names whose mount fails
        self.busy: set[Path] = set()  # targets whose plain unmount fails "target is busy"
        self.stuck: set[Path] = set()  # targets whose every unmount fails
        self._serial = 0

    def missing_tools(self) -> list[str]:
        return []

    def mounted(self, target: Path) -> str | None:
        return self.table.get(target)

    async def mount(self, image: Path, target: Path) -> None:
        self.calls.append(("mount", target.name))
        await trio.sleep(self.delay)
        if image.name in self.broken:
            raise MountFailed(f"mount {image} failed", ["mount", str(image)], "bad magic")
        self._serial += 1
        self.table[target] = f"/dev/fake{self._serial}"

    async def unmount(self, target: Path, *, lazy: bool = False) -> None:
        self.calls.append(("unmount-lazy" if lazy else "unmount", target.name))
        await trio.sleep(self.delay)
        if target in self.busy and not lazy:
            raise UnmountFailed(f"umount {target}", ["umount"], "target is busy")
        if target in self.stuck:
            raise UnmountFailed(f"umount {target}", ["umount"], "operation not permitted")
        del self.table[target]

    def count(self, what: str) -> int:
        return sum(1 for call, _ in self.calls if call == what)
