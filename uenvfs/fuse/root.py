"""The mount root: the image names it lists and looks up, and its own files: `.control`
(commands, root only), `.status` and `.metrics`, and `.socket`, a symlink to the query socket
(server/queries.py).

The root's listing and the content of `.status` and `.metrics` are snapshots shared by every
handle opened while they are current (see fuse/snapshots.py): a handle keeps a reference to
one, not a copy of its own."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar

import pyfuse3

from ..core import control, metrics
from ..core.errors import CommandError
from ..core.interfaces import CommandService, ImageService
from ..core.ledger import HandleKind, Ledger
from ..core.metrics import Labels, Metrics
from ..core.names import valid_name
from ..core.status import render_status
from .allocation import AllocationResolver
from .attributes import KERNEL_CACHE_SECONDS, from_stat, synthetic
from .handles import Handle, RootDirHandle
from .inodes import (
    CONTROL,
    METRICS,
    ROOT,
    SOCKET,
    STATUS,
    InodeTable,
)
from .listings import ENTRY_BYTES, Listing
from .shares import HandleShares
from .snapshots import Renderer

log = logging.getLogger(__name__)

SPECIAL_NAMES = {b".control": CONTROL, b".status": STATUS, b".metrics": METRICS,
                 b".socket": SOCKET}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

Gauges = dict[str, dict[Labels, float]]


@dataclass(eq=False, slots=True)
class DataHandle(Handle):
    """An open `.status` or `.metrics`: the content as of the open, so reads are consistent
    (a snapshot shared with the other handles opened while it was current)."""

    ino: int  # STATUS or METRICS
    data: bytes
    uid: int  # of the process that opened it
    kind: ClassVar[HandleKind] = HandleKind.DATA

    def opened_in(self, ledger: Ledger, pid: int) -> int:
        return ledger.opened(self.kind, 0, "", pid, uid=self.uid, data_ino=self.ino)

    def read(self, off: int, size: int) -> bytes:
        return self.data[off : off + size]

    def uncharge(self, shares: HandleShares) -> None:
        shares.give_back(self.uid, pinned=self.data)


@dataclass(eq=False, slots=True)
class ControlHandle(Handle):
    """An open `.control`: who opened it, for the log of the commands written."""

    pid: int
    uid: int
    alloc: str
    root: MountRoot
    kind: ClassVar[HandleKind] = HandleKind.CONTROL

    def opened_in(self, ledger: Ledger, pid: int) -> int:
        return ledger.opened(self.kind, 0, self.alloc, pid, uid=self.uid)

    async def write(self, data: bytes) -> int:
        await self.root.control(self, data)
        return len(data)

    def uncharge(self, shares: HandleShares) -> None:
        shares.give_back(self.uid, self.alloc)


class MountRoot:
    """The root directory: its names, their attributes, and the control files' content.

    The root's and the control files' attributes are cached for 1 s only, their content is
    as of the open (size 0 with direct_io: readers read until EOF). An image's directory keeps
    its inode number for the daemon's life; looking it up or listing the root mounts nothing.
    Every handle it opens is taken from `shares` for the opener's uid.

    Invariant: `_listing` is the root's listing as of its `_listing_version`, shared by every
    root handle opened since (each keeps it as long as it is open).
    """

    def __init__(
        self,
        images: ImageService,
        commands: CommandService,
        inodes: InodeTable,
        resolver: AllocationResolver,
        gauges: Callable[[], Gauges],
        socket: bytes,
        shares: HandleShares,
    ) -> None:
        self.images = images
        self.commands = commands  # what `.control` does
        self.inodes = inodes
        self.resolver = resolver
        self.gauges = gauges  # the state of the filesystem, for `.metrics`
        self.socket = socket  # the query socket's path: `.socket` leads there
        self.shares = shares
        self.started_ns = int(time.time() * 1e9)  # the time of every synthetic attribute
        self.status = Renderer(images.status, render_status, version=images.status_version,
                               ages=_shows_hold_times, off_loop=True)
        self.metrics = Renderer(self._metrics_inputs, _render_metrics)
        self._listing: Listing | None = None
        self._listing_version: object = None

    async def lookup(self, raw: bytes, uid: int = 0) -> pyfuse3.EntryAttributes:
        """The attributes of the root's entry *raw*: a control file or an image. *uid* asks."""
        special = SPECIAL_NAMES.get(raw)
        if special is not None:
            return self.attrs(special)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if not valid_name(name) or not await self.images.known(name, uid):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.image_attrs(name)

    def image_attrs(self, name: str) -> pyfuse3.EntryAttributes:
        """The attributes of an image's directory, without mounting it.

        Like autofs in browse mode, `stat` or `ls -l` of the mount root mounts nothing; looking
        inside does. While unmounted the attributes are synthetic and not cached, so that the
        real ones show as soon as the image is mounted.
        """
        ino = self.inodes.image_ino(name)
        target = self.images.alias_of(name)
        if target is not None:  # a label: a symlink to its image, which a reload may change
            attrs = synthetic(ino, stat.S_IFLNK | 0o777, self.started_ns, timeout=1.0)
            attrs.st_size = len(target.encode())
            return attrs
        mount = self.images.mounted(name)
        if mount is not None:
            return from_stat(os.lstat(mount.backing), ino)
        attrs = synthetic(ino, stat.S_IFDIR | 0o755, self.started_ns, timeout=0)
        attrs.entry_timeout = KERNEL_CACHE_SECONDS
        return attrs

    def listing(self) -> Listing:
        """The root's listing as of now: the one made before if nothing it shows changed
        since (the names, the labels' targets, which images are mounted), else a new one."""
        images = self.images
        # The sources' names only: a name removed from them is still served while mounted,
        # but no longer listed.
        names = sorted([*images.listed_names(), *images.aliases()])
        version = (names, [images.alias_of(n) or images.mounted(n) for n in names])
        listing = self._listing
        if listing is None or version != self._listing_version:
            listing = Listing([(b".", self.attrs(ROOT)), (b"..", self.attrs(ROOT))])
            listing += [(n, self.attrs(i)) for n, i in SPECIAL_NAMES.items()]
            listing += [(name.encode(), self.image_attrs(name)) for name in names]
            listing.memory = len(listing) * ENTRY_BYTES + sum(len(n) for n, _ in listing)
            self._listing, self._listing_version = listing, version
        return listing

    def open_dir(self, uid: int, restored: bool = False) -> RootDirHandle:
        """A new handle of the root for a process of *uid*."""
        listing = self.listing()
        self.shares.take(uid, pinned=listing, size=listing.memory, restored=restored)
        return RootDirHandle(listing, uid)

    def readlink(self, name: str) -> bytes:
        """The target of the label *name*: the name of its image (ENOENT once it is gone)."""
        target = self.images.alias_of(name)
        if target is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return target.encode()

    def attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        """The attributes of the root, of a control file or of `.socket`."""
        if ino == ROOT:
            return synthetic(ino, stat.S_IFDIR | 0o755, self.started_ns, timeout=1.0)
        if ino == SOCKET:
            attrs = synthetic(ino, stat.S_IFLNK | 0o777, self.started_ns, timeout=1.0)
            attrs.st_size = len(self.socket)
            return attrs
        mode = 0o200 if ino == CONTROL else 0o444
        # Size 0 with direct_io: readers read until EOF; the content changes all the time.
        return synthetic(ino, stat.S_IFREG | mode, self.started_ns, timeout=1.0)

    async def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> Handle:
        """A new handle of the control file *ino* (not the root)."""
        if ino == CONTROL:
            if ctx.uid != 0:
                raise pyfuse3.FUSEError(errno.EACCES)
            if not flags & (os.O_WRONLY | os.O_RDWR):
                raise pyfuse3.FUSEError(errno.EACCES)
            alloc = self.resolver.resolve(ctx.pid, ctx.uid)
            self.shares.take(ctx.uid, alloc)
            return ControlHandle(ctx.pid, ctx.uid, alloc, self)
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        renderer = self.status if ino == STATUS else self.metrics
        return self._data(ino, await renderer.get(), ctx.uid, restored=False)

    def restored(self, ino: int, uid: int) -> DataHandle:
        """A handle of `.status` or `.metrics` (*ino*) that the server before this one
        opened for a process of *uid*: its content as of now."""
        renderer = self.status if ino == STATUS else self.metrics
        return self._data(ino, renderer.now(), uid, restored=True)

    def _data(self, ino: int, data: bytes, uid: int, restored: bool) -> DataHandle:
        self.shares.take(uid, pinned=data, size=len(data), restored=restored)
        return DataHandle(ino, data, uid)

    def _metrics_inputs(self) -> tuple[Metrics, Gauges, Collection[str]]:
        counters = self.images.metrics
        gauges = self.gauges()
        gauges.update(metrics.process_gauges(counters.started))
        return counters, gauges, self.images.listed_names()

    async def control(self, caller: ControlHandle, data: bytes) -> None:
        """Apply the commands *caller* wrote, in order; the first that fails fails the write."""
        who = f"pid {caller.pid} uid {caller.uid} alloc {caller.alloc}"
        count = self.images.metrics.inc
        try:
            commands = control.parse(data)
        except CommandError as exc:
            count("uenvfs_control_commands_total", command="invalid", outcome="EINVAL")
            log.warning("control from %s: rejected %r: %s", who, data[:200], exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        for command in commands:
            try:
                outcome = await self.commands.execute(command)
            except CommandError as exc:
                code = errno.errorcode.get(exc.errno, str(exc.errno))
                count("uenvfs_control_commands_total", command=command.verb, outcome=code)
                log.warning("control from %s: %s: failed: %s (%s)", who, command, exc, code)
                raise pyfuse3.FUSEError(exc.errno) from None
            count("uenvfs_control_commands_total", command=command.verb, outcome="ok")
            log.info("control from %s: %s: %s", who, command, outcome)


def _shows_hold_times(document: dict[str, Any]) -> bool:
    """Whether a `.status` document shows a hold time that runs (it ages by itself)."""
    return any(m["hold_remaining"] is not None for m in document["mounts"])


def _render_metrics(inputs: tuple[Metrics, Gauges, Collection[str]]) -> bytes:
    return metrics.render(*inputs)
