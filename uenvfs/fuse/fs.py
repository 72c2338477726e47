"""The pyfuse3 adapter: answers each FUSE request with the parts that know the answer.

The parts: the inodes the kernel knows (inodes.py, which also says how inode numbers are
made), the open handles (handles.py), the replayed directory listings (listings.py), the
mount root with its control files (root.py), and what the manager's news does to the handles
and the kernel's caches (listener.py). The manager is reached through `ImageService` only, the
commands of `.control` through `CommandService`.

Every request inside an image is answered from its backing mount, which is mounted first if
needed (on the first access, or again after the hold timer unmounted it). Every open file or
directory handle is counted for the caller's allocation (see state.py).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT, XAttrNameT

from ..core import ledger as kinds
from ..core import metrics
from ..core.errors import MountError, errno_of
from ..core.interfaces import CommandService, ImageService
from ..core.ledger import Ledger, SharedLedger, Slot
from ..core.model import PREFIX_SHIFT, InodePrefixes
from ..kernel import cache, fusedev, paths
from .allocation import AllocationResolver
from .attributes import from_stat, negative_entry
from .descriptors import DescriptorBudget
from .handles import (
    OPEN_FLAGS,
    DeadHandle,
    DirHandle,
    FileHandle,
    GuardedFileHandle,
    Handle,
    HandleTable,
    ReopenedFileHandle,
    RootDirHandle,
)
from .inodes import CONTROL, METRICS, ROOT, InodeTable, Node, backing_path, child_ino
from .listener import FsListener
from .listings import Listing, ListingCache, scan
from .prefetch import Prefetcher
from .readonly import ReadOnlyOperations
from .root import (
    WRITE_FLAGS,
    ControlHandle,
    Gauges,
    MountRoot,
)
from .uses import FRESH, UseScanner
from .workers import Workers

if TYPE_CHECKING:
    from ..core.model import Mount

log = logging.getLogger(__name__)

NAME_MAX = 255
FMODE_EXEC = 0o40  # the kernel's __FMODE_EXEC: this open is execve loading a program
EXEC_SETTLE = (0.05, 0.5)  # when to look at an executing program's allocation again

P = ParamSpec("P")
T = TypeVar("T")


def fuse_errors(
    fn: Callable[Concatenate[UenvFS, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[UenvFS, P], Coroutine[Any, Any, T]]:
    """Count a handler's requests, and turn every error into the `FUSEError` that pyfuse3
    expects: the one place where domain errors become errnos."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: UenvFS, /, *args: P.args, **kwargs: P.kwargs) -> T:
        counters = self.metrics
        counters.requests[op] += 1
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            counters.errors[op, errno.errorcode.get(exc.errno, str(exc.errno))] += 1
            raise
        except Exception as exc:
            if isinstance(exc, MountError):
                log.debug("%s: %s", op, exc)
            elif not isinstance(exc, OSError):
                log.exception("%s failed unexpectedly", op)
            code = errno_of(exc)
            counters.errors[op, errno.errorcode.get(code, str(code))] += 1
            raise pyfuse3.FUSEError(code) from exc

    return wrapper


class UenvFS(ReadOnlyOperations):
    """Serves the root (image names and control files) and every image by passthrough.

    `listener` is to be handed to the manager (the daemon does, `Manager.listen`): it kills the
    handles of a force-unmounted image and makes the kernel forget stale names.
    """

    supports_dot_lookup = False  # no NFS export: the kernel resolves . and .. itself
    enable_writeback_cache = False

    def __init__(
        self,
        images: ImageService,
        commands: CommandService,
        prefixes: InodePrefixes,
        resolver: AllocationResolver | None = None,
        budget: DescriptorBudget | None = None,
        mountpoint: Path | None = None,
        hold_time: Callable[[], float] = lambda: 60.0,
    ) -> None:
        super().__init__()
        self.images = images
        self.metrics = images.metrics  # counted on every request: one attribute less
        self.resolver = resolver or AllocationResolver()
        self.inodes = InodeTable(prefixes)
        self.handles = HandleTable()
        self.listings = ListingCache()
        self.workers = Workers()  # the worker threads of each image (see guard.py)
        self.prefetcher = Prefetcher()
        self.budget = budget or DescriptorBudget(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.root = MountRoot(images, commands, self.inodes, self.resolver, self._gauges)
        # Processes sitting in images (none counted without a mountpoint to scan for); they
        # are scanned for more often the shorter the global hold time (*hold_time*).
        self.uses = UseScanner(mountpoint or Path(), self.inodes, self.resolver, images,
                               hold_time)
        self.listener = FsListener(images, self.handles, self.uses)
        self.initialized = trio.Event()  # set once the kernel's INIT request was answered
        self._live = self._pipe = -1  # the connection, and the pipe libfuse starts on
        self._ledger: Ledger | None = None
        self.resent: bool | None = None  # whether init() had unanswered requests queued again

    def attach(self, ledger: Ledger) -> None:
        """Keep the nodes and handles in *ledger* from now on, for the next server."""
        self.inodes.attach(ledger)
        self.handles.ledger = ledger
        self._ledger = ledger

    def connect(self, live: int, pipe: int) -> None:
        """libfuse starts on *pipe*, which holds the INIT of the connection *live* (see
        fusedev.py); `init` puts the connection in its place."""
        self._live, self._pipe = live, pipe

    def init(self) -> None:
        """pyfuse3 calls this while answering INIT; the reply follows at once, to the live
        connection.

        Requests that a server before this one read and did not answer are queued again
        here, before this server reads any: later, it could read one, then get it again.
        Not before the connection's first INIT was answered: that INIT would come again.
        """
        if self._pipe >= 0:
            trio.lowlevel.notify_closing(self._pipe)
            fusedev.switch_to(self._live, self._pipe)
            ledger = self._ledger
            if ledger is not None and isinstance(ledger, SharedLedger):
                if ledger.initialized:
                    self.resent = fusedev.resend(self._pipe)
                else:
                    ledger.mark_initialized()
        self.initialized.set()

    def restore_handles(self, slots: Sequence[Slot]) -> int:
        """The handles a server before this one opened, again in use with their numbers;
        those into images counted for their allocations. Returns how many were."""
        later = []
        counted = 0
        for slot in slots:
            if slot.kind == kinds.DATA:
                later.append(slot)  # after the counts: they show them
                continue
            handle = self._restored(slot)
            counted += isinstance(handle, (FileHandle, DirHandle))
            self.handles.restore(slot.fh, handle)
        for slot in later:
            self.handles.restore(slot.fh, self.root.data(slot.extra))
        return counted

    def _restored(self, slot: Slot) -> Handle:
        if slot.kind == kinds.ROOT_DIR:
            return RootDirHandle(self.root.entries())
        if slot.kind == kinds.CONTROL:
            return ControlHandle(slot.extra2, slot.extra, slot.alloc, self.root)
        node = self.inodes.get(slot.ino)
        mount = None if node is None else self.images.mounted(node.image)
        if (slot.dead or node is None or mount is None or not slot.alloc
                or (node.prefix and node.prefix != mount.version.prefix)):
            return DeadHandle()
        use = self.images.open(node.image, slot.alloc)
        if slot.kind == kinds.DIR:
            return DirHandle(node.image, use, node, None)
        _, path = backing_path(node, mount)
        return ReopenedFileHandle(node.image, use, node.ino, -1, self.prefetcher, self.budget,
                                  slot.alloc, path=path, guarded=mount.guarded)

    # -- the backing mounts --------------------------------------------------------------

    async def _backing(self, node: Node) -> tuple[Mount, bytes]:
        """The mount serving *node* and its path there, mounting the image if needed.

        Hot handlers call `_backing_now(node) or await _backing(node)`: no coroutine is made
        when the image is mounted (most requests).
        """
        return backing_path(node, await self.images.ensure_mounted(node.image))

    def _backing_now(self, node: Node) -> tuple[Mount, bytes] | None:
        """Like `_backing`, if the image is mounted now; else None."""
        mount = self.images.mounted(node.image)
        return None if mount is None else backing_path(node, mount)

    # -- lookups and attributes ------------------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name in (b".", b"..") or b"/" in name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent_inode == ROOT:
            return await self.root.lookup(name, ctx.uid)
        parent = self.inodes[parent_inode]
        if not parent.is_dir:
            # Never resolve a path through a symlink of the image.
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        mount, path = self._backing_now(parent) or await self._backing(parent)
        if len(name) > NAME_MAX:
            # As squashfs answers (no listing has such a name).
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        prefix = mount.version.prefix
        listing = self.listings.get((prefix, parent.rel))
        if listing is not None:
            # Listed before (and kept across drop_caches, unlike the kernel's dentries): no
            # system call, no disk read, for the names there and the names not there.
            attrs = listing.find(name)
            if attrs is None:
                return negative_entry()
            self.inodes.add_lookup(attrs.st_ino, parent, prefix, name, attrs.st_mode)
            return attrs
        try:
            if mount.guarded:
                st = await self._lstat_waiting(mount, path + b"/" + name)
            else:
                st = paths.lstat(path + b"/" + name)
        except FileNotFoundError:
            return negative_entry()
        ino = child_ino(prefix, st)
        self.inodes.add_lookup(ino, parent, prefix, name, st.st_mode)
        return from_stat(st, ino)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        self.inodes.forget(inode_list)

    @fuse_errors
    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode <= METRICS:
            return self.root.attrs(inode)
        node = self.inodes[inode]
        if not node.prefix:
            return self.root.image_attrs(node.image)
        mount, path = self._backing_now(node) or await self._backing(node)
        if mount.guarded:
            return from_stat(await self._lstat_waiting(mount, path), inode)
        return from_stat(paths.lstat(path), inode)

    async def _lstat_waiting(self, mount: Mount, path: bytes) -> os.stat_result:
        """`lstat` on guarded storage: in the loop if the kernel's caches can answer it, else
        in a worker thread of the image (its storage may hang; see guard.py)."""
        if len(path) < paths.ROOM:
            st = cache.lstat_cached(path)
            if st is not None:
                return st
        st = await self.workers.run(mount.name, paths.lstat, path)
        self._check_still(mount)
        return st

    async def _on_storage(self, mount: Mount, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on *mount*'s backing files: at once, or on guarded storage in a worker
        thread of the image (then ESTALE if the mount changed meanwhile). Not for the hot
        handlers (lookup, getattr, open, read): they avoid the coroutine when not guarded."""
        if not mount.guarded:
            return fn(*args)
        result = await self.workers.run(mount.name, fn, *args)
        self._check_still(mount)
        return result

    def _check_still(self, mount: Mount) -> None:
        """After waiting for a worker thread: ESTALE if *mount* is no longer the image's (it
        was unmounted or replaced meanwhile); the kernel looks the path up again."""
        if self.images.mounted(mount.name) is not mount:
            raise pyfuse3.FUSEError(errno.ESTALE)

    @fuse_errors
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileNameT:
        node = self.inodes[inode]
        if not node.prefix:  # in the root: a label's symlink
            return FileNameT(self.root.readlink(node.image))
        mount, path = await self._backing(node)
        return FileNameT(await self._on_storage(mount, paths.call, os.readlink, path))

    @fuse_errors
    async def access(self, inode: InodeT, mode: ModeT, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks the modes itself

    @fuse_errors
    async def getxattr(
        self, inode: InodeT, name: XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        node = self.inodes[inode] if inode > METRICS else None
        if node is None or self._browsing(node):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        mount, path = self._backing_now(node) or await self._backing(node)
        try:
            return await self._on_storage(mount, _getxattr, path, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @fuse_errors
    async def listxattr(
        self, inode: InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[XAttrNameT]:
        node = self.inodes[inode] if inode > METRICS else None
        if node is None or self._browsing(node):
            return []
        mount, path = self._backing_now(node) or await self._backing(node)
        names = await self._on_storage(mount, _listxattr, path)
        return [XAttrNameT(os.fsencode(n)) for n in names]

    def _browsing(self, node: Node) -> bool:
        """An unmounted image's directory: `ls -l` asks for its ACLs, which must not mount it."""
        return not node.prefix and self.images.mounted(node.image) is None

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # -- directories --------------------------------------------------------------------

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

    # -- files --------------------------------------------------------------------------

    @fuse_errors
    async def open(
        self, inode: InodeT, flags: FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if inode <= METRICS:
            if inode == ROOT:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if inode != CONTROL:
                await self.uses.refresh(FRESH)  # .status and .metrics count them right
            control = self.root.open(inode, flags, ctx)
            return pyfuse3.FileInfo(fh=self.handles.add(control, ctx.pid), direct_io=True)
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.inodes[inode]
        mount, path = self._backing_now(node) or await self._backing(node)
        if flags & FMODE_EXEC:
            alloc, final = self.resolver.resolve_exec(ctx.pid, ctx.uid)
        else:
            alloc, final = self.resolver.resolve(ctx.pid, ctx.uid), True
        self.budget.take(alloc)
        try:
            if mount.guarded:
                fd, size = await self._open_waiting(mount, path)
            else:
                fd = paths.open_file(path, OPEN_FLAGS)
        except BaseException:
            self.budget.give_back(alloc)
            raise
        use = self.images.open(node.image, alloc)
        if mount.guarded:
            handle: FileHandle = GuardedFileHandle(node.image, use, inode, fd, self.prefetcher,
                                                   self.budget, alloc, size=size)
        else:
            handle = FileHandle(node.image, use, inode, fd, self.prefetcher, self.budget, alloc)
        fh = self.handles.add(handle, ctx.pid)
        if not final:
            self.images.spawn(self._recount_exec, fh, handle, ctx.pid, ctx.uid,
                              task=f"exec:{ctx.pid}")
        # The image cannot change while mounted: keep the page cache across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def _open_waiting(self, mount: Mount, path: bytes) -> tuple[int, int]:
        """`open` on guarded storage (see `_lstat_waiting`): the fd and the file's size."""
        fd = cache.open_cached(path, OPEN_FLAGS) if len(path) < paths.ROOM else None
        if fd is None:
            fd = await self.workers.run(mount.name, paths.open_file, path, OPEN_FLAGS)
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

    def _gauges(self) -> Gauges:
        """The gauges of `.metrics`: the images' state and the filesystem's own."""
        document = self.images.status()
        gauges = metrics.state_gauges(document, len(self.images.listed_names()),
                                      self.handles.counted())
        verified = document.get("verify")
        if verified is not None:
            gauges["uenvfs_verify_differences"] = metrics.gauge(len(verified["differences"]))
        gauges["uenvfs_process_scans_total"] = metrics.gauge(self.uses.scans)
        gauges["uenvfs_process_scan_seconds"] = metrics.gauge(self.uses.scan_seconds)
        gauges["uenvfs_known_inodes"] = metrics.gauge(len(self.inodes))
        gauges["uenvfs_listing_cache_entries"] = metrics.gauge(self.listings.entries)
        gauges["uenvfs_listing_cache_bytes"] = metrics.gauge(self.listings.memory)
        gauges["uenvfs_storage_waits_total"] = metrics.gauge(self.workers.calls)
        gauges["uenvfs_readahead_windows_total"] = metrics.gauge(self.prefetcher.requests)
        gauges["uenvfs_open_files_refused_total"] = metrics.gauge(self.budget.refused)
        return gauges

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

    def _release(self, fh: int) -> None:
        handle = self.handles.release(fh)
        if handle is not None:
            handle.release(self.images)

    def close_all(self) -> None:
        """The FUSE connection is gone: its handles will never be released; drop them."""
        for fh in list(self.handles):
            self._release(fh)
        self.prefetcher.close()
        self.uses.dev = None  # processes sitting in images no longer use this connection
        self.images.sitting({})

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


def _getxattr(path: bytes, name: bytes) -> bytes:
    with paths.reachable(path) as short:
        return os.getxattr(short, name, follow_symlinks=False)


def _listxattr(path: bytes) -> list[str]:
    with paths.reachable(path) as short:
        return os.listxattr(short, follow_symlinks=False)
