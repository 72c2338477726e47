"""The pyfuse3 adapter: answers each FUSE request with the parts that know the answer.

`UenvFS` is the `pyfuse3.Operations` object: its handlers are its methods, one family of
requests per module (pyfuse3 calls them on this one object):

    fuse/fs.py           the parts, the connection, names and attributes: lookup, getattr,
                         readlink, the xattrs, statfs; the gauges of `.metrics`
    fuse/files.py        open, read, write, release (and the counting of executables)
    fuse/directories.py  opendir, readdir, releasedir
    fuse/requests.py     what they share: `fuse_errors` (errors to errnos), the backing mounts
    fuse/readonly.py     every writing request: EROFS

The parts: the inodes the kernel knows (fuse/inodes.py, which also says how inode numbers are
made), the open handles (fuse/handles.py), the replayed directory listings (fuse/listings.py),
the mount root with its control files (fuse/root.py), and what the manager's news does to the
handles and the kernel's caches (fuse/listener.py). The manager is reached through
`ImageService` only, the commands of `.control` through `CommandService`. Every open file or
directory handle is counted for the caller's allocation (see core/state.py). The handles of a
server before this one are restored by server/resume.py.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable, Sequence
from pathlib import Path

import pyfuse3
import trio
from pyfuse3 import FileNameT, InodeT, ModeT, XAttrNameT

from ..core import metrics
from ..core.config import Config
from ..core.interfaces import CommandService, ImageService
from ..core.ledger import Ledger
from ..core.model import InodePrefixes
from ..core.shared_ledger import SharedLedger
from ..kernel import fusedev, paths
from .allocation import AllocationResolver
from .attributes import from_stat, negative_entry
from .descriptors import DescriptorBudget
from .directories import DirectoryRequests
from .files import FileRequests
from .handles import HandleTable
from .inodes import ROOT, SOCKET, InodeTable, Node, child_ino
from .listener import FsListener
from .listings import ListingCache
from .prefetch import Prefetcher
from .requests import fuse_errors
from .root import Gauges, MountRoot
from .shares import HandleShares
from .uses import UseScanner
from .workers import Workers

NAME_MAX = 255


class UenvFS(FileRequests, DirectoryRequests):
    """Serves the root (image names and control files) and every image by passthrough.

    It makes the parts every family of requests uses (declared by `Requests`). `listener` is
    to be handed to the manager (the daemon does, `Manager.listen`): it kills the handles of a
    force-unmounted image and makes the kernel forget stale names.
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
        shares: HandleShares | None = None,
        mountpoint: Path | None = None,
        hold_time: Callable[[], float] = lambda: 60.0,
        socket_path: Path | None = None,
    ) -> None:
        super().__init__()
        self.images = images
        self.metrics = images.metrics  # counted on every request: one attribute less
        self.resolver = resolver if resolver is not None else AllocationResolver()
        self.inodes = InodeTable(prefixes)
        self.handles = HandleTable()
        self.listings = ListingCache()
        self.workers = Workers()  # the worker threads of each image (see fuse/workers.py)
        self.prefetcher = Prefetcher()
        self.budget = budget or DescriptorBudget(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.shares = shares or HandleShares()
        self.root = MountRoot(images, commands, self.inodes, self.resolver, self._gauges,
                              os.fsencode(socket_path or Config().socket_path), self.shares)
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
        kernel/fusedev.py); `init` puts the connection in its place."""
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

    def close_all(self) -> None:
        """The FUSE connection is gone: its handles will never be released; drop them."""
        for fh in list(self.handles):
            self._release(fh)
        self.prefetcher.close()
        self.uses.disconnect()

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
        if inode <= SOCKET:
            return self.root.attrs(inode)
        node = self.inodes[inode]
        if not node.prefix:
            return self.root.image_attrs(node.image)
        mount, path = self._backing_now(node) or await self._backing(node)
        if mount.guarded:
            return from_stat(await self._lstat_waiting(mount, path), inode)
        return from_stat(paths.lstat(path), inode)

    @fuse_errors
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileNameT:
        if inode == SOCKET:
            return FileNameT(self.root.socket)
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
        node = self.inodes[inode] if inode > SOCKET else None
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
        node = self.inodes[inode] if inode > SOCKET else None
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

    # -- .metrics ----------------------------------------------------------------------

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
        gauges["uenvfs_identity_reads_total"] = metrics.gauge(self.resolver.lookups)
        gauges["uenvfs_allocation_owners"] = metrics.gauge(len(self.resolver.owners))
        gauges["uenvfs_known_inodes"] = metrics.gauge(len(self.inodes))
        gauges["uenvfs_listing_cache_entries"] = metrics.gauge(self.listings.entries)
        gauges["uenvfs_listing_cache_bytes"] = metrics.gauge(self.listings.memory)
        gauges["uenvfs_storage_waits_total"] = metrics.gauge(self.workers.calls)
        gauges["uenvfs_readahead_windows_total"] = metrics.gauge(self.prefetcher.requests)
        gauges["uenvfs_open_files_refused_total"] = metrics.gauge(self.budget.refused)
        shares = self.shares
        gauges["uenvfs_open_handles_refused_total"] = metrics.gauge(shares.refused)
        gauges["uenvfs_handles_without_descriptor"] = metrics.gauge(shares.held_total)
        gauges["uenvfs_snapshot_bytes"] = metrics.gauge(shares.pinned_total)
        gauges["uenvfs_status_renders_total"] = metrics.gauge(self.root.status.renders)
        gauges["uenvfs_metrics_renders_total"] = metrics.gauge(self.root.metrics.renders)
        ledger = self._ledger
        if isinstance(ledger, SharedLedger):
            gauges["uenvfs_ledger_allocations"] = metrics.gauge(len(ledger.allocations))
            gauges["uenvfs_ledger_log_bytes"] = metrics.gauge(ledger.log_bytes)
            gauges["uenvfs_ledger_full"] = metrics.gauge(int(ledger.full))
        return gauges


def _getxattr(path: bytes, name: bytes) -> bytes:
    with paths.reachable(path) as short:
        return os.getxattr(short, name, follow_symlinks=False)


def _listxattr(path: bytes) -> list[str]:
    with paths.reachable(path) as short:
        return os.listxattr(short, follow_symlinks=False)
