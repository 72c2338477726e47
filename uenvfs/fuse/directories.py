"""The requests on directories: opendir, readdir, releasedir.

A directory of an image is listed once per image version (fuse/listings.py), in a worker
thread of the image, and the listing is replayed to every later opendir: an image never
changes. An open directory of an image is counted for the caller's allocation from the start
of its opendir (so the image stays mounted while it is listed) until it is released; the
root's listing is shared by the handles opened while it is current (fuse/root.py). Every
directory handle is taken from the shares of the opener's uid (fuse/shares.py): it holds no
descriptor, but memory.
"""

from __future__ import annotations

import errno

import pyfuse3
from pyfuse3 import FileHandleT, InodeT

from ..core.model import PREFIX_SHIFT, Mount
from .handles import DirHandle
from .inodes import METRICS, ROOT, Node
from .listings import Listing, scan
from .requests import Requests, fuse_errors


class DirectoryRequests(Requests):
    """The handlers of the requests on directories (a part of `UenvFS`)."""

    @fuse_errors
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        if inode == ROOT:
            return self._add(self.root.open_dir(ctx.uid), ctx.pid)
        if inode <= METRICS:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        node = self.inodes[inode]
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        mount, path = self._backing_now(node) or await self._backing(node)
        alloc = self.resolver.resolve(ctx.pid, ctx.uid)
        self.shares.take(ctx.uid, alloc)
        # Counted before any wait (no await since the mount was checked): the image's hold
        # timer cannot unmount it while the directory is listed.
        use = self.images.open(node.image, alloc)
        entries = self.listings.recall((mount.version.prefix, node.rel))
        if entries is None:
            try:
                entries = await self._list(node, mount, path)
            except BaseException:
                self.images.close(node.image, use)
                self.shares.give_back(ctx.uid, alloc)
                raise
        return self._add(DirHandle(node.image, use, ctx.uid, node, entries), ctx.pid)

    async def _list(self, node: Node, mount: Mount, path: bytes) -> Listing:
        """The listing of *node* at *path* in *mount*, kept for replay: read once per image
        version, as an image never changes. In a worker thread of the image: a big directory
        (or slow storage, or hung storage, which holds the image's own threads only) must not
        hold up the requests of every other image. ESTALE, and nothing kept, if *mount* went
        away meanwhile (a force-unmount: a use does not keep the image mounted then): what
        was read may be the empty backing directory."""
        prefix = mount.version.prefix
        listing = await self._in_worker(mount, scan, path, node.ino, prefix)
        return self.listings.add((prefix, node.rel), listing)

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
        """The listing of a directory opened by a server before this one (its use, counted
        again, keeps the image mounted)."""
        node = handle.node
        mount, path = self._backing_now(node) or await self._backing(node)
        entries = self.listings.recall((mount.version.prefix, node.rel))
        handle.entries = entries if entries is not None else await self._list(node, mount, path)

    @fuse_errors
    async def releasedir(self, fh: FileHandleT) -> None:
        self._release(fh)
