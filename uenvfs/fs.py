"""The pyfuse3 adapter: inodes, passthrough to the backing mounts, and the control files.

Inode numbers::

    1                      the root (pyfuse3.ROOT_INODE)
    2, 3, 4                .control, .status, .metrics
    slot << 44             the directory of an image name (its slot is fixed per name)
    slot << 44 | ino       a file inside an image: `slot` is the tree (image version) it was
                           found in, `ino` its inode number in the backing mount

so an image that is unmounted and mounted again keeps its inode numbers and the kernel's cached
dentries stay valid, while a replaced image file gets new numbers: the old ones answer ESTALE,
which makes the kernel look the path up again.

Every request inside an image is answered from its backing mount, which is mounted first if
needed (on the first access, or again after the hold timer unmounted it). Every open file or
directory handle is counted for the caller's allocation (see state.py).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT, XAttrNameT

from . import control, metrics
from .allocation import AllocationResolver
from .errors import CommandError, MountError, errno_of
from .manager import Manager, Mount
from .names import valid_name
from .prefetch import Prefetcher, Readahead
from .state import Use

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
CONTROL, STATUS, METRICS = InodeT(2), InodeT(3), InodeT(4)
SPECIAL_NAMES = {b".control": CONTROL, b".status": STATUS, b".metrics": METRICS}
SLOT_SHIFT = 44
INO_MASK = (1 << SLOT_SHIFT) - 1
# Images never change while mounted: the kernel may cache names and attributes for long.
TIMEOUT = 3600.0
NAME_MAX = 255
LISTING_CACHE_ENTRIES = 200_000  # directory entries kept for replay (about 200 bytes each)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
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
        metrics = self.manager.metrics
        metrics.requests[op] += 1
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            metrics.errors[op, errno.errorcode.get(exc.errno, str(exc.errno))] += 1
            raise
        except Exception as exc:
            if isinstance(exc, MountError):
                log.debug("%s: %s", op, exc)
            elif not isinstance(exc, OSError):
                log.exception("%s failed unexpectedly", op)
            code = errno_of(exc)
            metrics.errors[op, errno.errorcode.get(code, str(code))] += 1
            raise pyfuse3.FUSEError(code) from exc

    return wrapper


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@dataclass(eq=False)
class Node:
    """An inode the kernel knows inside an image. `rel` is its path in the image.

    Every component of `rel` but the last is a directory (lookups only happen in directory
    nodes), so resolving it never follows a symlink of the image.
    """

    ino: int
    name: str  # the image
    slot: int  # the tree it belongs to; 0 for the image directory itself
    rel: bytes
    is_dir: bool = True
    lookups: int = 0

    def child(self, name: bytes) -> bytes:
        return self.rel + b"/" + name if self.rel else name


class Listing(list[tuple[bytes, pyfuse3.EntryAttributes]]):
    """A directory's entries in order (`.` and `..` first), with their attributes."""

    names: dict[bytes, pyfuse3.EntryAttributes] | None = None

    def find(self, name: bytes) -> pyfuse3.EntryAttributes | None:
        """The attributes of the entry *name*, if the directory has it (an index is made on
        the first call)."""
        if self.names is None:
            self.names = dict(self[2:])
        return self.names.get(name)


@dataclass(eq=False)
class Counted:
    """A handle counted as a use of an image by an allocation (released exactly once)."""

    name: str
    use: Use


@dataclass(eq=False)
class FileHandle(Counted):
    """An open file of an image. Its backing fd is closed when the handle is released or the
    image force-unmounted; reads fail with EIO from then on."""

    ino: int = 0
    fd: int = -1
    dead: bool = False
    readahead: Readahead | None = None  # made on the first read

    def close(self) -> None:
        if not self.dead:
            self.dead = True
            os.close(self.fd)
            if self.readahead is not None:
                self.readahead.closed = True


@dataclass(eq=False)
class DirHandle(Counted):
    node: Node
    entries: Listing
    dead: bool = False  # the image was force-unmounted


@dataclass(eq=False)
class RootDirHandle:
    entries: Listing


@dataclass(eq=False)
class DataHandle:
    """An open `.status` or `.metrics`: a snapshot taken at open, so reads are consistent."""

    data: bytes


@dataclass(eq=False)
class ControlHandle:
    pid: int
    uid: int
    alloc: str


Handle = FileHandle | DirHandle | RootDirHandle | DataHandle | ControlHandle


class UenvFS(pyfuse3.Operations):
    """Serves the root (image names and control files) and every image by passthrough."""

    supports_dot_lookup = False  # no NFS export: the kernel resolves . and .. itself
    enable_writeback_cache = False

    def __init__(
        self,
        manager: Manager,
        resolver: AllocationResolver | None = None,
    ) -> None:
        super().__init__()
        self.manager = manager
        self.resolver = resolver or AllocationResolver()
        self.nodes: dict[int, Node] = {}
        self.image_inos: dict[str, int] = {}
        self.handles: dict[int, Handle] = {}
        # Directory listings by (tree slot, path), least recently used first.
        self.listings: OrderedDict[tuple[int, bytes], Listing] = OrderedDict()
        self.listed_entries = 0
        self._next_fh = 1
        self.started = time.time()
        self.initialized = trio.Event()  # set once the kernel's INIT request was answered
        self.prefetcher = Prefetcher()
        manager.on_force_unmount = self._kill_handles
        manager.on_stale_entry = self._forget_entry
        manager.on_listing_changed = self._listing_changed

    def init(self) -> None:
        """pyfuse3 calls this while answering the kernel's INIT; the reply follows at once."""
        self.initialized.set()

    # -- inodes and attributes ----------------------------------------------------------

    def _image_ino(self, name: str) -> int:
        ino = self.image_inos.get(name)
        if ino is None:
            ino = self.image_inos[name] = self.manager.new_slot() << SLOT_SHIFT
            self.nodes[ino] = Node(ino, name, 0, b"")
        return ino

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise fail(errno.ESTALE)
        return node

    async def _backing(self, node: Node) -> tuple[Mount, bytes]:
        """The mount serving *node* and its path there, mounting the image if needed.

        Hot handlers call `_backing_now(node) or await _backing(node)`: no coroutine is made
        when the image is mounted (most requests).
        """
        return self._served(node, await self.manager.ensure_mounted(node.name))

    def _backing_now(self, node: Node) -> tuple[Mount, bytes] | None:
        """Like `_backing`, if the image is mounted now; else None."""
        mount = self.manager.mounted(node.name)
        return None if mount is None else self._served(node, mount)

    @staticmethod
    def _served(node: Node, mount: Mount) -> tuple[Mount, bytes]:
        if node.slot and node.slot != mount.tree.slot:
            raise fail(errno.ESTALE)  # the image file was replaced since the kernel saw it
        return mount, mount.root + b"/" + node.rel if node.rel else mount.root

    @staticmethod
    def _attrs(st: os.stat_result, ino: int, timeout: float = TIMEOUT) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = InodeT(ino)
        attrs.generation = 0
        attrs.entry_timeout = timeout
        attrs.attr_timeout = timeout
        attrs.st_mode = ModeT(st.st_mode)
        attrs.st_nlink = st.st_nlink
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = st.st_rdev
        attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    def _synthetic(self, ino: int, mode: int, timeout: float = TIMEOUT) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = InodeT(ino)
        attrs.entry_timeout = timeout
        attrs.attr_timeout = timeout
        attrs.st_mode = ModeT(mode)
        attrs.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        attrs.st_uid = 0
        attrs.st_gid = 0
        attrs.st_blksize = 4096
        now = int(self.started * 1e9)
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = now
        return attrs

    def _special_attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        if ino == ROOT:
            return self._synthetic(ino, stat.S_IFDIR | 0o755, timeout=1.0)
        mode = 0o200 if ino == CONTROL else 0o444
        # Size 0 with direct_io: readers read until EOF; the content changes all the time.
        return self._synthetic(ino, stat.S_IFREG | mode, timeout=1.0)

    @staticmethod
    def _child_ino(mount: Mount, st: os.stat_result) -> int:
        if st.st_ino > INO_MASK:
            raise fail(errno.EOVERFLOW)
        return mount.tree.slot << SLOT_SHIFT | st.st_ino

    def _remember(self, ino: int, parent: Node, slot: int, name: bytes, mode: int) -> None:
        """The kernel now knows *ino* once more (a lookup, or an entry of readdirplus)."""
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino, parent.name, slot, parent.child(name),
                                          stat.S_ISDIR(mode))
        node.lookups += 1

    # -- lookups --------------------------------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name in (b".", b"..") or b"/" in name:
            raise fail(errno.ENOENT)
        if parent_inode == ROOT:
            return await self._lookup_image(name)
        parent = self._node(parent_inode)
        if not parent.is_dir:
            raise fail(errno.ENOTDIR)  # never resolve a path through a symlink of the image
        mount, path = self._backing_now(parent) or await self._backing(parent)
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)  # as squashfs answers (no listing has such a name)
        listing = self.listings.get((mount.tree.slot, parent.rel))
        if listing is not None:
            # Listed before (and kept across drop_caches, unlike the kernel's dentries): no
            # system call, no disk read, for the names there and the names not there.
            attrs = listing.find(name)
            if attrs is None:
                return self._missing()
            self._remember(attrs.st_ino, parent, mount.tree.slot, name, attrs.st_mode)
            return attrs
        try:
            st = os.lstat(path + b"/" + name)
        except FileNotFoundError:
            return self._missing()
        ino = self._child_ino(mount, st)
        self._remember(ino, parent, mount.tree.slot, name, st.st_mode)
        return self._attrs(st, ino)

    @staticmethod
    def _missing() -> pyfuse3.EntryAttributes:
        """A negative entry: an image never changes, so the kernel may remember that the name
        does not exist (Python's imports, PATH and library searches ask again and again)."""
        missing = pyfuse3.EntryAttributes()
        missing.st_ino = InodeT(0)
        missing.entry_timeout = TIMEOUT
        return missing

    async def _lookup_image(self, raw: bytes) -> pyfuse3.EntryAttributes:
        special = SPECIAL_NAMES.get(raw)
        if special is not None:
            return self._special_attrs(special)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(errno.ENOENT) from None
        if not valid_name(name) or not await self.manager.known(name):
            raise fail(errno.ENOENT)
        return self._image_attrs(name)

    def _image_attrs(self, name: str) -> pyfuse3.EntryAttributes:
        """The attributes of an image's directory, without mounting it.

        Like autofs in browse mode, `stat` or `ls -l` of the mount root mounts nothing; looking
        inside does. While unmounted the attributes are synthetic and not cached, so that the
        real ones show as soon as the image is mounted.
        """
        ino = self._image_ino(name)
        mount = self.manager.mounted(name)
        if mount is not None:
            return self._attrs(os.lstat(mount.backing), ino)
        attrs = self._synthetic(ino, stat.S_IFDIR | 0o755, timeout=0)
        attrs.entry_timeout = TIMEOUT
        return attrs

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is None or not node.slot:
                continue  # the root, control files and image directories live forever
            node.lookups -= count
            if node.lookups <= 0:
                del self.nodes[ino]

    @fuse_errors
    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode <= METRICS:
            return self._special_attrs(inode)
        node = self._node(inode)
        if not node.slot:
            return self._image_attrs(node.name)
        _, path = self._backing_now(node) or await self._backing(node)
        return self._attrs(os.lstat(path), inode)

    @fuse_errors
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileNameT:
        _, path = await self._backing(self._node(inode))
        return FileNameT(os.readlink(path))

    @fuse_errors
    async def access(self, inode: InodeT, mode: ModeT, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checks the modes itself

    @fuse_errors
    async def getxattr(
        self, inode: InodeT, name: XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        node = self._node(inode) if inode > METRICS else None
        if node is None or self._browsing(node):
            raise fail(pyfuse3.ENOATTR)
        _, path = self._backing_now(node) or await self._backing(node)
        try:
            return os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise fail(pyfuse3.ENOATTR) from None
            raise

    @fuse_errors
    async def listxattr(
        self, inode: InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[XAttrNameT]:
        node = self._node(inode) if inode > METRICS else None
        if node is None or self._browsing(node):
            return []
        _, path = self._backing_now(node) or await self._backing(node)
        return [XAttrNameT(os.fsencode(n)) for n in os.listxattr(path, follow_symlinks=False)]

    def _browsing(self, node: Node) -> bool:
        """An unmounted image's directory: `ls -l` asks for its ACLs, which must not mount it."""
        return not node.slot and self.manager.mounted(node.name) is None

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # -- directories --------------------------------------------------------------------

    def _new_handle(self, handle: Handle) -> FileHandleT:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        return FileHandleT(fh)

    def _alloc(self, ctx: pyfuse3.RequestContext) -> str:
        return self.resolver.resolve(ctx.pid, ctx.uid)

    @fuse_errors
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        if inode == ROOT:
            return self._new_handle(RootDirHandle(self._root_entries()))
        if inode <= METRICS:
            raise fail(errno.ENOTDIR)
        node = self._node(inode)
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        mount, path = self._backing_now(node) or await self._backing(node)
        alloc = self._alloc(ctx)
        # No await from here on: the listing and the count see the same mount.
        entries = self._list(node, mount, path)
        use = self.manager.open(node.name, alloc)
        return self._new_handle(DirHandle(node.name, use, node, entries))

    def _root_entries(self) -> Listing:
        entries = Listing([(b".", self._special_attrs(ROOT)), (b"..", self._special_attrs(ROOT))])
        entries += [(n, self._special_attrs(i)) for n, i in SPECIAL_NAMES.items()]
        # The sources' names only: a name removed from them is still served while mounted,
        # but no longer listed.
        names = sorted(self.manager.catalog.listing())
        entries += [(name.encode(), self._image_attrs(name)) for name in names]
        return entries

    def _list(self, node: Node, mount: Mount, path: bytes) -> Listing:
        """The entries of a directory with their attributes, read once per image version:
        an image never changes, so a listing is replayed to every later opendir."""
        key = (mount.tree.slot, node.rel)
        entries = self.listings.get(key)
        if entries is not None:
            self.listings.move_to_end(key)
            return entries
        here = self._attrs(os.lstat(path), node.ino)
        entries = Listing([(b".", here), (b"..", here)])
        with os.scandir(path) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                ino = self._child_ino(mount, st)
                entries.append((os.fsencode(entry.name), self._attrs(st, ino)))
        self.listings[key] = entries
        self.listed_entries += len(entries)
        while self.listed_entries > LISTING_CACHE_ENTRIES and len(self.listings) > 1:
            _, dropped = self.listings.popitem(last=False)
            self.listed_entries -= len(dropped)
        return entries

    @fuse_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.handles.get(fh)
        if isinstance(handle, DirHandle) and handle.dead:
            raise fail(errno.EIO)
        if not isinstance(handle, (DirHandle, RootDirHandle)):
            raise fail(errno.EBADF)
        entries = handle.entries
        parent = handle.node if isinstance(handle, DirHandle) else None
        for index in range(start_id, len(entries)):
            name, attrs = entries[index]
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break
            if parent is not None and index >= 2:  # entries 0 and 1 are . and ..
                # readdirplus makes the kernel know the entry, as a lookup would.
                self._remember(attrs.st_ino, parent, attrs.st_ino >> SLOT_SHIFT, name,
                               attrs.st_mode)

    @fuse_errors
    async def releasedir(self, fh: FileHandleT) -> None:
        self._release(fh)

    # -- files --------------------------------------------------------------------------

    @fuse_errors
    async def open(
        self, inode: InodeT, flags: FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        writing = flags & WRITE_FLAGS
        if inode == CONTROL:
            if ctx.uid != 0:
                raise fail(errno.EACCES)
            if not flags & (os.O_WRONLY | os.O_RDWR):
                raise fail(errno.EACCES)
            handle: Handle = ControlHandle(ctx.pid, ctx.uid, self._alloc(ctx))
            return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True)
        if inode in (STATUS, METRICS):
            if writing:
                raise fail(errno.EROFS)
            data = (control.render_status(self.manager.status()) if inode == STATUS
                    else self._metrics())
            return pyfuse3.FileInfo(fh=self._new_handle(DataHandle(data)), direct_io=True)
        if inode == ROOT:
            raise fail(errno.EISDIR)
        if writing:
            raise fail(errno.EROFS)
        node = self._node(inode)
        _, path = self._backing_now(node) or await self._backing(node)
        executing = bool(flags & FMODE_EXEC)
        if executing:
            alloc, final = self.resolver.resolve_exec(ctx.pid, ctx.uid)
        else:
            alloc, final = self._alloc(ctx), True
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        use = self.manager.open(node.name, alloc)
        fh = self._new_handle(FileHandle(node.name, use, inode, fd))
        if not final:
            self.manager.spawn(self._recount_exec, fh, ctx.pid, ctx.uid, task=f"exec:{ctx.pid}")
        # The image cannot change while mounted: keep the page cache across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def _recount_exec(self, fh: int, pid: int, uid: int) -> None:
        """An executable opened by execve counts for the allocation of the program it became.

        Its environment is readable once the execve is over; look again shortly after.
        """
        for delay in EXEC_SETTLE:
            await trio.sleep(delay)
            handle = self.handles.get(fh)
            if not isinstance(handle, FileHandle):
                return  # released already: the program ended
            alloc, _ = self.resolver.resolve_exec(pid, uid)
            moved = self.manager.transfer(handle.name, handle.use, alloc)
            if moved is not None:
                handle.use = moved
                return

    def _metrics(self) -> bytes:
        gauges = metrics.state_gauges(
            self.manager.status(), len(self.manager.catalog.listing()),
            sum(isinstance(h, Counted) for h in self.handles.values()))
        gauges["uenvfs_known_inodes"] = metrics.gauge(len(self.nodes))
        gauges["uenvfs_listing_cache_entries"] = metrics.gauge(self.listed_entries)
        gauges["uenvfs_readahead_windows_total"] = metrics.gauge(self.prefetcher.requests)
        return metrics.render(self.manager.metrics, gauges)

    @fuse_errors
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if isinstance(handle, FileHandle):
            if handle.dead:
                raise fail(errno.EIO)
            # In the loop even when it must wait for the disk: handing cold reads to worker
            # threads measured slower here (read every file cold: 12 s instead of 7.5 s).
            # Sequential readers of big files are read ahead of by the prefetch thread.
            data = os.pread(handle.fd, size, off)
            ra = handle.readahead
            if ra is None:
                ra = handle.readahead = Readahead()
            window = ra.after_read(off, len(data))
            if window is not None:
                self.prefetcher.ahead(ra, handle.fd, *window)
            return data
        if isinstance(handle, DataHandle):
            return handle.data[off : off + size]
        raise fail(errno.EBADF)

    @fuse_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        handle = self.handles.get(fh)
        if not isinstance(handle, ControlHandle):
            raise fail(errno.EBADF)
        await self._control(handle, buf)
        return len(buf)

    async def _control(self, caller: ControlHandle, data: bytes) -> None:
        who = f"pid {caller.pid} uid {caller.uid} alloc {caller.alloc}"
        count = self.manager.metrics.inc
        try:
            commands = control.parse(data)
        except CommandError as exc:
            count("uenvfs_control_commands_total", command="invalid", outcome="EINVAL")
            log.warning("control from %s: rejected %r: %s", who, data[:200], exc)
            raise fail(exc.errno) from None
        for command in commands:
            try:
                outcome = await self.manager.execute(command)
            except CommandError as exc:
                code = errno.errorcode.get(exc.errno, str(exc.errno))
                count("uenvfs_control_commands_total", command=command.verb, outcome=code)
                log.warning("control from %s: %s: failed: %s (%s)", who, command, exc, code)
                raise fail(exc.errno) from None
            count("uenvfs_control_commands_total", command=command.verb, outcome="ok")
            log.info("control from %s: %s: %s", who, command, outcome)

    @fuse_errors
    async def release(self, fh: FileHandleT) -> None:
        self._release(fh)

    def _release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if isinstance(handle, FileHandle):
            handle.close()
        if isinstance(handle, Counted):
            self.manager.close(handle.name, handle.use)

    def close_all(self) -> None:
        """The FUSE connection is gone: its handles will never be released; drop them."""
        for fh in list(self.handles):
            self._release(fh)
        self.prefetcher.close()

    async def _kill_handles(self, name: str) -> None:
        """Force-unmount: every handle into *name* fails with EIO from now on.

        Their cached pages go too, or a read (or a mapped program's page fault) would still
        be served from the page cache of an image that is gone.
        """
        inodes = set()
        killed = 0
        for handle in self.handles.values():
            if isinstance(handle, FileHandle) and handle.name == name and not handle.dead:
                handle.close()
                inodes.add(handle.ino)
                killed += 1
            elif isinstance(handle, DirHandle) and handle.name == name:
                handle.dead = True
                killed += 1
        if killed:
            log.warning("%s: %d open handles now fail with EIO", name, killed)
        if inodes:
            await trio.to_thread.run_sync(_invalidate_pages, sorted(inodes))

    def _forget_entry(self, name: str) -> None:
        """Make the kernel look *name* up again (its image file changed or went away)."""
        pyfuse3.invalidate_entry_async(ROOT, FileNameT(name.encode()), ignore_enoent=True)

    def _listing_changed(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.manager.mounts:
                self._forget_entry(name)

    # -- everything that would write -------------------------------------------------------

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
            return self._special_attrs(inode)  # `echo cmd > .control` truncates first
        raise fail(errno.EROFS)

    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise fail(errno.EROFS)

    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise fail(errno.EROFS)

    async def unlink(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        raise fail(errno.EROFS)

    async def rmdir(
        self, parent_inode: InodeT, name: FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        raise fail(errno.EROFS)

    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise fail(errno.EROFS)

    async def rename(
        self, parent_inode_old: InodeT, name_old: FileNameT, parent_inode_new: InodeT,
        name_new: FileNameT, flags: FlagT, ctx: pyfuse3.RequestContext,
    ) -> None:
        raise fail(errno.EROFS)

    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise fail(errno.EROFS)

    async def create(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise fail(errno.EROFS)

    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise fail(errno.EROFS)

    async def removexattr(
        self, inode: InodeT, name: XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        raise fail(errno.EROFS)


def _invalidate_pages(inodes: Sequence[int]) -> None:
    """Drop the kernel's cached data of *inodes* (in a worker thread: it may wait for reads)."""
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(InodeT(ino), attr_only=False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the kernel had forgotten it: nothing cached
                log.warning("cannot drop cached pages of inode %d: %s", ino, exc)
