"""Open file and directory handles: each kind reads, lists, writes and releases itself.

A request on a handle is one look-up in the `HandleTable` and one call of the kind's method;
what a kind cannot do answers EBADF.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import ClassVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT

from ..core.interfaces import ImageService
from ..core.ledger import HandleKind, Ledger
from ..core.state import Use
from ..kernel import paths
from ..kernel.cache import is_cached
from .descriptors import DescriptorBudget
from .inodes import Node
from .listings import Listing
from .prefetch import Prefetcher, Readahead
from .shares import HandleShares
from .workers import Workers

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class Handle:
    """An open file or directory of the filesystem. The base kind can do nothing (EBADF)."""

    __slots__ = ()
    # What the ledger keeps it as. A class attribute: in Python 3.11 `HandleKind.FILE` is a
    # slow look-up (the enum's metaclass hooks attribute access), and `add` is on every open.
    kind: ClassVar[HandleKind]

    def opened_in(self, ledger: Ledger, pid: int) -> int:
        """Record this new handle, opened by process *pid*, in *ledger* (what it keeps of each
        kind: `HandleKind`); returns the number the ledger gives it."""
        raise NotImplementedError

    def read(self, off: int, size: int) -> bytes:
        raise pyfuse3.FUSEError(errno.EBADF)

    def waits(self, off: int, size: int) -> bool:
        """Whether this read may wait for slow storage: then it is made by `read_waiting`."""
        return False

    async def read_waiting(self, workers: Workers, off: int, size: int) -> bytes:
        raise pyfuse3.FUSEError(errno.EBADF)

    def listing(self) -> tuple[Listing, Node | None]:
        """The entries to replay, and the directory's node if they are inside an image."""
        raise pyfuse3.FUSEError(errno.EBADF)

    async def write(self, data: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EBADF)

    def release(self, images: ImageService) -> None:
        """The kernel released the handle (or its connection is gone): called once."""

    def uncharge(self, shares: HandleShares) -> None:
        """Give back what the handle took of *shares* when it was opened (or restored): called
        once, at its release."""


@dataclass(eq=False, slots=True)
class ImageHandle(Handle):
    """A handle into an image, counted as a use of it by an allocation until released, and
    in *shares* for the uid that opened it."""

    image: str
    use: Use
    uid: int  # of the process that opened it

    def release(self, images: ImageService) -> None:
        images.close(self.image, self.use)

    def uncharge(self, shares: HandleShares) -> None:
        shares.give_back(self.uid, self.use.alloc)

    def kill(self) -> int | None:
        """Force-unmount: fail with EIO from now on. Returns the inode whose cached pages must
        go (0 for none), or None if the handle had been closed already."""
        raise NotImplementedError


@dataclass(eq=False, slots=True)
class FileHandle(ImageHandle):
    """An open file of an image. Its backing fd is closed when the handle is released or the
    image force-unmounted (once no read in a worker thread uses it any more); reads fail with
    EIO from then on. Its descriptor is counted in `budget` for `owner` and `uid`, the handle
    in the shares for `owner` (not `use.alloc`: an executable's use moves once it runs)."""

    ino: int
    fd: int
    prefetcher: Prefetcher
    budget: DescriptorBudget
    owner: str  # the allocation whose share of descriptors holds `fd`
    dead: bool = False
    readahead: Readahead | None = None  # made on the first read
    reading: int = 0  # reads of `fd` under way in worker threads
    kind: ClassVar[HandleKind] = HandleKind.FILE

    def opened_in(self, ledger: Ledger, pid: int) -> int:
        return ledger.opened(self.kind, self.ino, self.owner, pid, uid=self.uid)

    def read(self, off: int, size: int) -> bytes:
        if self.dead:
            raise pyfuse3.FUSEError(errno.EIO)
        # In the loop even when it must wait for the disk (but see GuardedFileHandle):
        # handing cold reads to worker threads measured slower here (read every file cold:
        # 12 s instead of 7.5 s). Sequential readers of big files are read ahead of by the
        # prefetch thread.
        data = os.pread(self.fd, size, off)
        self.have_read(off, len(data))
        return data

    def have_read(self, off: int, size: int) -> None:
        """Note a read, for reading ahead."""
        ra = self.readahead
        if ra is None:
            ra = self.readahead = Readahead()
        window = ra.after_read(off, size)
        if window is not None:
            self.prefetcher.ahead(ra, self.fd, *window)

    def close(self) -> None:
        if not self.dead:
            self.dead = True
            if self.readahead is not None:
                self.readahead.closed = True
            if not self.reading:
                self._close_fd()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.budget.give_back(self.owner, self.uid)

    def release(self, images: ImageService) -> None:
        self.close()
        images.close(self.image, self.use)

    def uncharge(self, shares: HandleShares) -> None:
        shares.give_back_file(self.uid, self.owner)

    def kill(self) -> int | None:
        if self.dead:
            return None
        self.close()
        return self.ino


@dataclass(eq=False, slots=True)
class GuardedFileHandle(FileHandle):
    """An open file of an image on guarded storage (see fuse/workers.py): a read that would
    wait for the storage is made in one of the image's worker threads."""

    size: int = 0  # the file's size: an image never changes

    def waits(self, off: int, size: int) -> bool:
        return not self.dead and not is_cached(self.fd, off, min(size, self.size - off))

    async def read_waiting(self, workers: Workers, off: int, size: int) -> bytes:
        """`read` in a worker thread of the image. The fd stays open until it is done (a
        release meanwhile closes it after), so its number cannot be reused under it."""
        self.reading += 1
        try:
            data = await workers.run(self.image, os.pread, self.fd, size, off)
        finally:
            self.reading -= 1
            if self.dead and not self.reading:
                self._close_fd()
        if self.dead:
            raise pyfuse3.FUSEError(errno.EIO)  # force-unmounted meanwhile
        self.have_read(off, len(data))
        return data


@dataclass(eq=False, slots=True)
class ReopenedFileHandle(GuardedFileHandle):
    """A file that a server before this one opened (see core/ledger.py): its backing file is
    opened again at its first read, in a worker thread of the image; reads then go as for any
    file of its mount (*guarded*: those that would wait, in worker threads)."""

    path: bytes = b""
    guarded: bool = False
    opening: trio.Event | None = None

    def waits(self, off: int, size: int) -> bool:
        if self.fd < 0:
            return not self.dead
        return self.guarded and GuardedFileHandle.waits(self, off, size)

    async def read_waiting(self, workers: Workers, off: int, size: int) -> bytes:
        if self.fd < 0:
            await self._reopen(workers)
        if self.guarded:
            return await GuardedFileHandle.read_waiting(self, workers, off, size)
        return self.read(off, size)

    async def _reopen(self, workers: Workers) -> None:
        if self.opening is not None:
            await self.opening.wait()  # another read is opening it
        else:
            self.opening = trio.Event()
            try:
                self.budget.take(self.owner, self.uid)
                try:
                    fd = await workers.run(self.image, paths.open_file, self.path, OPEN_FLAGS)
                except BaseException:
                    self.budget.give_back(self.owner, self.uid)
                    raise
                if self.dead:
                    os.close(fd)
                    self.budget.give_back(self.owner, self.uid)
                else:
                    self.fd, self.size = fd, os.fstat(fd).st_size
            finally:
                self.opening.set()
                self.opening = None
        if self.fd < 0:
            raise pyfuse3.FUSEError(errno.EIO)  # force-unmounted meanwhile


@dataclass(eq=False, slots=True)
class DeadHandle(Handle):
    """A handle of a server before this one that can no longer be served (its image was
    force-unmounted, or its mount is gone): EIO. Only restored, never added."""

    def read(self, off: int, size: int) -> bytes:
        raise pyfuse3.FUSEError(errno.EIO)

    def waits(self, off: int, size: int) -> bool:
        return False

    def listing(self) -> tuple[Listing, Node | None]:
        raise pyfuse3.FUSEError(errno.EIO)


@dataclass(eq=False, slots=True)
class DirHandle(ImageHandle):
    """An open directory of an image: its listing, replayed to every readdir."""

    node: Node
    entries: Listing | None  # None: to be listed again (opened by a server before this one)
    dead: bool = False  # the image was force-unmounted
    kind: ClassVar[HandleKind] = HandleKind.DIR

    def opened_in(self, ledger: Ledger, pid: int) -> int:
        return ledger.opened(self.kind, self.node.ino, self.use.alloc, pid, uid=self.uid)

    def listing(self) -> tuple[Listing, Node | None]:
        if self.dead or self.entries is None:
            raise pyfuse3.FUSEError(errno.EIO)
        return self.entries, self.node

    def kill(self) -> int | None:
        self.dead = True
        return 0


@dataclass(eq=False, slots=True)
class RootDirHandle(Handle):
    """The open mount root: image names and control files, as listed at opendir (a listing
    shared by the handles opened while it was current: see `MountRoot.listing`)."""

    entries: Listing
    uid: int  # of the process that opened it
    kind: ClassVar[HandleKind] = HandleKind.ROOT_DIR

    def opened_in(self, ledger: Ledger, pid: int) -> int:
        return ledger.opened(self.kind, 0, "", pid, uid=self.uid)

    def listing(self) -> tuple[Listing, Node | None]:
        return self.entries, None

    def uncharge(self, shares: HandleShares) -> None:
        shares.give_back(self.uid, pinned=self.entries)


class HandleTable(dict[int, Handle]):
    """The open handles by number, each kept in the ledger too (for the next server; it
    numbers them). `table[fh]` of an unknown number raises EBADF, or EIO for a handle that
    is only in the ledger, dead: one a server restoring the last one's could not afford (see
    server/resume.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()  # numbers from 1 up; the server gives it the shared one
        # The handle added last: the handler that added it returns at once, and pyfuse3
        # writes its answer in the same step, so it is the kernel's once another handle is
        # added or released (until then the ledger has it as pending; see core/ledger.py).
        self._last = 0

    def __missing__(self, fh: int) -> Handle:
        raise pyfuse3.FUSEError(errno.EIO if self.ledger.is_dead(fh) else errno.EBADF)

    def add(self, handle: Handle, pid: int = 0) -> FileHandleT:
        """Number *handle* (opened by process *pid*), to be answered at once."""
        if self._last:
            self.ledger.confirm(self._last)
        fh = self._last = handle.opened_in(self.ledger, pid)
        self[fh] = handle
        return FileHandleT(fh)

    def restore(self, fh: int, handle: Handle) -> None:
        """A handle that a server before this one opened (in the ledger already)."""
        self[fh] = handle

    def release(self, fh: int) -> Handle | None:
        """Forget handle *fh*; returns it (None if unknown: released already)."""
        if self._last:
            self.ledger.confirm(self._last)
            self._last = 0
        handle = self.pop(fh, None)
        self.ledger.released(fh)  # (a stale number changes nothing; a dead one is freed)
        return handle

    def counted(self) -> int:
        """How many handles count as uses of images."""
        return sum(isinstance(h, ImageHandle) for h in self.values())

    def kill(self, image: str) -> tuple[int, list[int]]:
        """Force-unmount *image*: every handle into it fails with EIO from now on. Returns how
        many handles that changed, and the inodes whose cached pages must go."""
        killed = 0
        inodes = set()
        for fh, handle in self.items():
            if isinstance(handle, ImageHandle) and handle.image == image:
                ino = handle.kill()
                if ino is not None:
                    self.ledger.killed(fh)
                    killed += 1
                    if ino:
                        inodes.add(ino)
        return killed, sorted(inodes)
