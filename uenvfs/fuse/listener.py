"""What the manager's news about images does to open handles and the kernel's caches."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Sequence

import pyfuse3
import trio
from pyfuse3 import FileNameT, InodeT

from ..core.interfaces import ImageService
from .handles import HandleTable
from .inodes import ROOT
from .uses import UseScanner, few

log = logging.getLogger(__name__)


class FsListener:
    """The filesystem's `MountListener` (the daemon hands it to the manager)."""

    def __init__(self, images: ImageService, handles: HandleTable, uses: UseScanner) -> None:
        self.images = images
        self.handles = handles
        self.uses = uses

    async def force_unmounted(self, name: str) -> None:
        """Every handle into *name* fails with EIO from now on; the mount namespaces holding
        it (as the scan just before found them) are named in the log: they keep their tree.

        The handles' cached pages go too, or a read (or a mapped program's page fault) would
        still be served from the page cache of an image that is gone.
        """
        for alloc, pids in self.uses.holders.get(name, ()):
            log.warning("%s: a mount namespace of %s (processes %s) holds it and keeps its tree "
                        "until it ends", name, alloc, few(pids, 4))
        killed, inodes = self.handles.kill(name)
        if killed:
            log.warning("%s: %d open handles now fail with EIO", name, killed)
        if inodes:
            await trio.to_thread.run_sync(_invalidate_pages, inodes)

    def entry_stale(self, name: str) -> None:
        """Make the kernel look *name* up again (its image file changed or went away)."""
        pyfuse3.invalidate_entry_async(ROOT, FileNameT(name.encode()), ignore_enoent=True)

    def listing_changed(self, names: Iterable[str]) -> None:
        """Names added or removed: forget them, unless mounted (a removed name is forgotten
        once unmounted)."""
        for name in names:
            if not self.images.has_backing_mount(name):
                self.entry_stale(name)

    async def check_uses(self, max_age: float) -> None:
        await self.uses.refresh(max_age)

    async def verify(self) -> list[str]:
        return await self.uses.verify()


def _invalidate_pages(inodes: Sequence[int]) -> None:
    """Drop the kernel's cached data of *inodes* (in a worker thread: it may wait for reads)."""
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(InodeT(ino), attr_only=False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the kernel had forgotten it: nothing cached
                log.warning("cannot drop cached pages of inode %d: %s", ino, exc)
