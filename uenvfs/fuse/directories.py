"""The requests on directories: opendir, readdir, releasedir.

A directory of an image is listed once per image version (fuse/listings.py), in a worker
thread of the image, and the listing is replayed to every later opendir: an image never
changes. An open directory of an image is counted for the caller's allocation until it is
released; the root's listing is made at each opendir (fuse/root.py).
"""

from __future__ import annotations

import errno

import pyfuse3
from pyfuse3 import FileHandleT, InodeT

from ..core.model import PREFIX_SHIFT
from .handles import DirHandle, RootDirHandle
from .inodes import METRICS, ROOT, Node
from .listings import Listing, scan
from .requests import Requests, fuse_errors


class DirectoryRequests(Requests):
    """The handlers of the requests on directories (a part of `UenvFS`)."""

    @fuse_errors
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        if inode == ROOT:
            return self.handles.add(RootDirHandle(self.root.entries()), ctx.pid)
        if inode <= METRICS:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        node = self.inodes[inode]
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        mount, path = self._backing_now(node) or await self._backing(node)
        prefix = mount.version.prefix
        entries = self.listings.recall((prefix, node.rel))
        if entries is None:
            # Read once per image version: an image never changes, so a listing is replayed
            # to every later opendir. In a worker thread: a big directory (or slow storage)
            # must not hold up the requests of every other image.
            entries = self.listings.add((prefix, node.rel), await self._scan(node, path, prefix))
            mount, path = self._backing_now(node) or await self._backing(node)
            if mount.version.prefix != prefix:
                raise pyfuse3.FUSEError(errno.ESTALE)  # replaced meanwhile: look it up again
        alloc = self.resolver.resolve(ctx.pid, ctx.uid)
        # No await from here on: the count is of the mount just checked.
        use = self.images.open(node.image, alloc)
        return self.handles.add(DirHandle(node.image, use, node, entries), ctx.pid)

    async def _scan(self, node: Node, path: bytes, prefix: int) -> Listing:
        """The listing of *node* at *path*, read in a worker thread of the image (an image on
        hung storage holds its own threads, not all of them)."""
        return await self.workers.run(node.image, scan, path, node.ino, prefix)

    @fuse_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.handles[fh]
        if isinstance(handle, DirHandle) and handle.entries is None:
            await self._list_again(handle)
        entries, parent = handle.listing()
        add_lookup = self.inodes.add_lookup
        for index in range(start_id, len(entries)):
            name, attrs = entries[index]
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break
            if parent is not None and index >= 2:  # entries 0 and 1 are . and ..
                # readdirplus makes the kernel know the entry, as a lookup would.
                add_lookup(attrs.st_ino, parent, attrs.st_ino >> PREFIX_SHIFT, name, attrs.st_mode)

    async def _list_again(self, handle: DirHandle) -> None:
        """The listing of a directory opened by a server before this one."""
        node = handle.node
        mount, path = self._backing_now(node) or await self._backing(node)
        prefix = mount.version.prefix
        entries = self.listings.recall((prefix, node.rel))
        if entries is None:
            entries = self.listings.add((prefix, node.rel), await self._scan(node, path, prefix))
        handle.entries = entries

    @fuse_errors
    async def releasedir(self, fh: FileHandleT) -> None:
        self._release(fh)
