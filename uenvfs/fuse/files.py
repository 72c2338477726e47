"""The requests on files: open (the control files' too), read, write, release, and the
truncation that precedes a write to `.control`.

An open file of an image is counted for the caller's allocation (see core/state.py) until
it is released; an executable opened by execve is counted again once its program runs (its
allocation is known only then). On guarded storage, an open that the kernel's caches cannot
answer waits in a worker thread of the image, and so does a read (see fuse/handles.py).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FlagT, InodeT

from ..kernel import cache, paths
from .handles import OPEN_FLAGS, FileHandle, GuardedFileHandle
from .inodes import CONTROL, METRICS, ROOT
from .requests import Requests, fuse_errors
from .root import WRITE_FLAGS
from .uses import FRESH

if TYPE_CHECKING:
    from ..core.model import Mount

FMODE_EXEC = 0o40  # the kernel's __FMODE_EXEC: this open is execve loading a program
EXEC_SETTLE = (0.05, 0.5)  # when to look at an executing program's allocation again


class FileRequests(Requests):
    """The handlers of the requests on files (a part of `UenvFS`)."""

    @fuse_errors
    async def open(
        self, inode: InodeT, flags: FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if inode <= METRICS:
            if inode == ROOT:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if inode != CONTROL:
                await self.uses.refresh(FRESH)  # .status and .metrics count them right
            control = await self.root.open(inode, flags, ctx)
            return pyfuse3.FileInfo(fh=self._add(control, ctx.pid), direct_io=True)
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.inodes[inode]
        mount, path = self._backing_now(node) or await self._backing(node)
        if flags & FMODE_EXEC:
            alloc, final = self.resolver.resolve_exec(ctx.pid, ctx.uid)
        else:
            alloc, final = self.resolver.resolve(ctx.pid, ctx.uid), True
        uid = ctx.uid
        self.budget.take(alloc, uid)
        try:
            self.shares.take_file(uid, alloc)
        except BaseException:
            self.budget.give_back(alloc, uid)
            raise
        # Counted before any wait (no await since the mount was checked): the image's hold
        # timer cannot unmount it while the file is opened in a worker thread.
        use = self.images.open(node.image, alloc)
        try:
            if mount.guarded:
                fd, size = await self._open_waiting(mount, path)
            else:
                fd = paths.open_file(path, OPEN_FLAGS)
        except BaseException:
            self.images.close(node.image, use)
            self.budget.give_back(alloc, uid)
            self.shares.give_back_file(uid, alloc)
            raise
        if mount.guarded:
            handle: FileHandle = GuardedFileHandle(node.image, use, uid, inode, fd,
                                                   self.prefetcher, self.budget, alloc,
                                                   size=size)
        else:
            handle = FileHandle(node.image, use, uid, inode, fd, self.prefetcher, self.budget,
                                alloc)
        fh = self._add(handle, ctx.pid)
        if not final:
            self.images.spawn(self._recount_exec, fh, handle, ctx.pid, ctx.uid,
                              task=f"exec:{ctx.pid}")
        # The image cannot change while mounted: keep the page cache across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def _open_waiting(self, mount: Mount, path: bytes) -> tuple[int, int]:
        """`open` on guarded storage (see `_lstat_waiting`): the fd and the file's size;
        ESTALE if *mount* went away meanwhile, whatever the open found (see `_in_worker`)."""
        fd = cache.open_cached(path, OPEN_FLAGS) if len(path) < paths.ROOM else None
        if fd is None:
            try:
                fd = await self.workers.run(mount.name, paths.open_file, path, OPEN_FLAGS)
            except OSError:
                self._check_still(mount)
                raise
            if self.images.mounted(mount.name) is not mount:
                os.close(fd)
                raise pyfuse3.FUSEError(errno.ESTALE)
        try:
            return fd, os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise

    async def _recount_exec(self, fh: int, handle: FileHandle, pid: int, uid: int) -> None:
        """An executable opened by execve counts for the allocation of the program it became.

        Its environment is readable once the execve is over; look again shortly after.
        """
        for delay in EXEC_SETTLE:
            await trio.sleep(delay)
            if self.handles.get(fh) is not handle:
                return  # released already: the program ended
            alloc, _ = self.resolver.resolve_exec(pid, uid)
            moved = self.images.transfer(handle.image, handle.use, alloc)
            if moved is not None:
                handle.use = moved
                self.handles.ledger.moved(fh, alloc)
                return

    @fuse_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        if handle.waits(off, size):
            return await handle.read_waiting(self.workers, off, size)
        return handle.read(off, size)

    @fuse_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return await self.handles[fh].write(buf)

    @fuse_errors
    async def release(self, fh: FileHandleT) -> None:
        self._release(fh)

    @fuse_errors
    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == CONTROL and attr.st_size == 0 and fields.update_size and not (
            fields.update_mode or fields.update_uid or fields.update_gid
        ):
            return self.root.attrs(inode)  # `echo cmd > .control` truncates first
        raise pyfuse3.FUSEError(errno.EROFS)
