"""What the FUSE filesystem and the mount manager know of each other.

The filesystem asks the manager's side through `ImageService` (manager/images.py) and has
its `.control` commands carried out through `CommandService` (manager/executor.py); the
manager tells the filesystem through `MountListener`. The daemon wires them together.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .control import Command
    from .metrics import Metrics
    from .model import Mount
    from .state import Scanned, Use


class ImageService(Protocol):
    """The images as the filesystem sees them: names, mounts, counted uses, and `.status`."""

    @property
    def metrics(self) -> Metrics:
        """Counters; the filesystem counts its requests and errors there."""

    def mounted(self, name: str) -> Mount | None:
        """The backing mount of *name* if it is mounted now (no mounting)."""

    def serving(self) -> Collection[Mount]:
        """The backing mounts of the images mounted now (no mounting)."""

    async def ensure_mounted(self, name: str) -> Mount:
        """The backing mount of *name*, mounting it first if needed (MountError if not)."""

    async def known(self, name: str, uid: int = 0) -> bool:
        """Whether *name* is an image (*uid* asks: it may be refused a program map's time)."""

    def has_backing_mount(self, name: str) -> bool:
        """Whether a backing mount of *name* exists (serving, or being unmounted)."""

    def listed_names(self) -> Collection[str]:
        """The names the mount root lists."""

    def alias_of(self, name: str) -> str | None:
        """The image that the label name *name* stands for, or None."""

    def aliases(self) -> dict[str, str]:
        """Every label name of the root, with the image it stands for."""

    def open(self, name: str, alloc: str) -> Use:
        """Count a handle of *alloc* (the image is mounted: just after `ensure_mounted`)."""

    def close(self, name: str, use: Use) -> None:
        """A handle counted in *use* was released."""

    def transfer(self, name: str, use: Use, alloc: str) -> Use | None:
        """Count one open of *use* for *alloc* instead; None if that use is gone."""

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object, task: str) -> None:
        """Run *fn* as a background task (it outlives the request that started it)."""

    def status(self) -> dict[str, Any]:
        """The `.status` document."""

    def scanned(self, found: Mapping[str, Mapping[str, Scanned]]) -> None:
        """A scan of the processes found these uses (image -> allocation -> processes sitting
        there, namespaces holding it): count them."""

    def disconnected(self) -> None:
        """The FUSE connection is gone: no process sits in an image any more (namespaces
        still hold them)."""

    def scanned_uses(self) -> bool:
        """Whether a mounted image has a use that only a scan can end."""

    def status_version(self) -> object:
        """A value (compared with ==) that changes whenever `status` changes, but for the
        hold times still to run (they change with time)."""


class CommandService(Protocol):
    """What `.control` does."""

    async def execute(self, command: Command) -> str:
        """Apply one `.control` command: a short outcome, or `CommandError`."""


class MountListener(Protocol):
    """What the manager tells the filesystem about images."""

    async def force_unmounted(self, name: str) -> None:
        """*name* is being force-unmounted: its open handles must fail from now on."""

    def entry_stale(self, name: str) -> None:
        """The kernel must look *name* up again (its image file changed or went away)."""

    def listing_changed(self, names: Iterable[str]) -> None:
        """*names* were added to or removed from the image sources."""

    async def check_uses(self, max_age: float) -> None:
        """Count the processes sitting in images now (a scan at most *max_age* s old)."""

    async def verify(self) -> list[str]:
        """What differs between the counts and a full scan of the processes."""


class NoListener:
    """A `MountListener` that does nothing (no filesystem attached, as in manager tests)."""

    async def force_unmounted(self, name: str) -> None:
        pass

    def entry_stale(self, name: str) -> None:
        pass

    def listing_changed(self, names: Iterable[str]) -> None:
        pass

    async def check_uses(self, max_age: float) -> None:
        pass

    async def verify(self) -> list[str]:
        return []
