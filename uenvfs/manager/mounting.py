"""Making and removing one backing mount: the steps of a first access, and of an unmount.

The manager decides *when* (the state machine, one task per mount or unmount); this module
does the work: find the image file, tell its version, check it, mount it, detach it.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from ..core.config import Config
from ..core.errors import (
    TRANSIENT_ERRNOS,
    MountFailed,
    NodeResourceFailed,
    UnmountFailed,
)
from ..core.ledger import (
    NO_LEDGER,
    Ledger,
    LogRecord,
    version_record,
)
from ..core.metrics import Metrics
from ..core.model import Identity, ImageVersion, InodePrefixes, Mount
from ..image import squashfs
from ..image.catalog import Catalog
from ..kernel import loop, mountinfo
from .backend import FileMountBackend, MountBackend, is_mount_point
from .storage import Storage

log = logging.getLogger(__name__)

# A first access whose image file is replaced while it is being checked goes round again, so
# many times at most.
CHANGING_ATTEMPTS = 3


def _failed(what: str, exc: OSError) -> MountFailed:
    kind = NodeResourceFailed if exc.errno in TRANSIENT_ERRNOS else MountFailed
    return kind(f"{what}: {exc.strerror}")


@dataclass
class Probe:
    """What the worker thread of a first access found: the image file's identity, its first
    bytes and, if it mounted the file too, the mount's source and device."""

    identity: Identity
    header: bytes
    source: str | None = None
    device: int = 0


@dataclass
class _Progress:
    """How far a worker thread got: written by the thread, read by the loop to say which step
    failed or hung (also after the thread was abandoned)."""

    mounting: bool = False


def _probe_and_mount(
    path: Path,
    target: Path,
    accept: Callable[[Identity], bool],
    mount_file: Callable[[int, Path, Path], str] | None,
    progress: _Progress,
) -> Probe:
    """The file-system steps of a first access, in one worker thread (blocking).

    The image file at *path* must be a regular file. It is opened without blocking (a FIFO
    named by a map would wait for a writer forever) and read for its first bytes, so that a
    file on storage that does not answer is found out here, in a worker thread, rather than
    later on the event loop. If *mount_file* is given and *accept* takes the file's identity
    (a version already checked, or no checking wanted), the open file is mounted at *target*
    right away: the very file whose identity the mount will carry.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MountFailed(f"image {path} is not a regular file")
        probe = Probe((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
                      os.pread(fd, squashfs.SUPERBLOCK_SIZE, 0))
        if mount_file is not None and accept(probe.identity):
            progress.mounting = True
            os.set_blocking(fd, True)  # the loop device reads through this open file
            probe.source = mount_file(fd, path, target)
            probe.device = os.stat(target).st_dev  # the kernel's squashfs: answers at once
    finally:
        os.close(fd)  # a loop device holds its own reference
    return probe


def _only(known: Identity) -> Callable[[Identity], bool]:
    return lambda identity: identity == known


def identity_of(path: Path) -> Identity:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Mounter:
    """Makes and removes backing mounts, and knows each name's last image version.

    Invariant: a name's version changes exactly when its image file's identity does, so no
    inode number of old content is ever reused for new content.
    """

    def __init__(
        self,
        config: Config,
        backend: MountBackend,
        catalog: Catalog,
        metrics: Metrics,
        prefixes: InodePrefixes,
        clock: Callable[[], float],
        version_changed: Callable[[str], None],
        *,
        threads: bool = True,
    ) -> None:
        self.config = config
        self.backend = backend
        self.catalog = catalog
        self.metrics = metrics
        self.prefixes = prefixes
        self.clock = clock
        self.version_changed = version_changed
        self.paths: dict[str, Path] = {}  # last known image path of each name
        # One worker thread at most per image for the image file: a file on hung storage
        # holds one thread, not every thread of the daemon.
        self._threads: dict[str, trio.CapacityLimiter] = {}
        self.threads = threads
        # The backend's blocking mount of an open file, for the worker thread of a first access.
        self._mount_file = backend.mount_file if isinstance(backend, FileMountBackend) else None
        self._versions: dict[str, ImageVersion] = {}  # the last one of each name
        self.storage = Storage(config.storage_guard)
        self.ledger: Ledger = NO_LEDGER  # versions are written there for the next server

    def attach(self, ledger: Ledger) -> None:
        """Write the versions to *ledger* from now on (and those known now); the last of
        each name is what its compactions keep."""
        self.ledger = ledger
        ledger.keep(self.records)
        for name, version in self._versions.items():
            self._record(name, version)

    def records(self) -> Iterator[LogRecord]:
        """The ledger's records of the last version of every image."""
        for name, v in self._versions.items():
            yield version_record(v.prefix, name, v.identity, v.validated)

    def _record(self, name: str, version: ImageVersion) -> None:
        self.ledger.version(version.prefix, name, version.identity, version.validated)

    def restore(self, versions: Mapping[int, tuple[str, Identity, bool]]) -> None:
        """The versions a server before this one handed out (prefix -> name, identity,
        validated): the last one of each name is its version again."""
        for prefix, (name, identity, validated) in sorted(versions.items()):
            self._versions[name] = ImageVersion(prefix, identity, validated)

    async def mount(self, name: str) -> Mount:
        """Mount *name*'s image at its backing directory. Raises `MountError`.

        The image file's steps run in one worker thread with the kernel backend: its identity
        and, when its version needs no check (already checked, or `validate` is off), the
        mount itself. A version to check first goes round once more after the check.
        """
        path = await self.catalog.resolve(name)
        if path is None:
            raise MountFailed(f"{name} is no longer in any image source")
        self.paths[name] = path
        target = self.config.backing_root / name
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # The state directory is the node's: whatever went wrong there is not the image's.
            raise NodeResourceFailed(f"cannot create {target}: {exc.strerror}") from exc
        if is_mount_point(target):
            log.warning("%s: a stale mount sits at %s; detaching it first", name, target)
            await self.backend.unmount(target, lazy=True)
        mount_file = self._mount_file
        accept = self._acceptable(name)
        for _ in range(CHANGING_ATTEMPTS):
            probe = await self._in_thread(name, path, target, accept, mount_file)
            version = self.version(name, probe.identity)
            if probe.source is not None:
                return self._mount(name, path, target, version, probe.source, probe.device)
            if self.config.validate and not version.validated:
                await self._validate(path, probe)
                version.validated = True
                self._record(name, version)
            if mount_file is None:
                await self.backend.mount(path, target)
                source = self.backend.mounted(target)
                if source is None:
                    raise MountFailed(
                        f"{self.backend.name} reported success but {target} is not mounted")
                return self._mount(name, path, target, version, source,
                                   mountinfo.device_at(target) or 0)
            accept = _only(version.identity)  # that one, checked now
        raise MountFailed(f"image {path} changed while it was being checked, "
                          f"{CHANGING_ATTEMPTS} times")

    def _acceptable(self, name: str) -> Callable[[Identity], bool]:
        """Which image file identities may be mounted without a check first (called in the
        worker thread: it must not look at anything the loop changes)."""
        if not self.config.validate:
            return lambda identity: True
        last = self._versions.get(name)
        if last is None or not last.validated:
            return lambda identity: False
        return _only(last.identity)

    async def _in_thread(
        self,
        name: str,
        path: Path,
        target: Path,
        accept: Callable[[Identity], bool],
        mount_file: Callable[[int, Path, Path], str] | None,
    ) -> Probe:
        """`_probe_and_mount` in a worker thread, abandoned after the mount timeout (the file
        may sit on a hung filesystem: the loop must go on serving every other image)."""
        progress = _Progress()
        if not self.threads:
            try:
                return _probe_and_mount(path, target, accept, mount_file, progress)
            except OSError as exc:
                raise self._step_failed(path, progress, exc) from exc
        limiter = self._threads.get(name)
        if limiter is None:
            limiter = self._threads[name] = trio.CapacityLimiter(1)
        timeout = self.config.mount_timeout
        with trio.move_on_after(timeout):
            try:
                return await trio.to_thread.run_sync(
                    _probe_and_mount, path, target, accept, mount_file, progress,
                    abandon_on_cancel=True, limiter=limiter)
            except OSError as exc:
                raise self._step_failed(path, progress, exc) from exc
        if progress.mounting:
            raise MountFailed(f"mount of {path} on {target} gave no answer in {timeout:g} s; "
                              "abandoned")
        raise MountFailed(f"image {path}: no answer in {timeout:g} s (its storage may hang); "
                          "abandoned")

    @staticmethod
    def _step_failed(path: Path, progress: _Progress, exc: OSError) -> MountFailed:
        if progress.mounting:
            return MountFailed(str(exc))  # as the backend says it (the call and its errno)
        return _failed(f"image {path}", exc)

    async def _validate(self, path: Path, probe: Probe) -> None:
        """Refuse a corrupt image with a clear reason, before the kernel sees it."""
        started = self.clock()
        try:
            problem = await squashfs.check_read_image(path, probe.header, probe.identity[2],
                                                      self.config.mount_timeout)
        except OSError as exc:
            raise _failed(f"image {path}", exc) from exc
        self.metrics.observe("uenvfs_check_seconds", self.clock() - started)
        if problem is not None:
            raise MountFailed(f"image {path} is not valid: {problem}")

    def version(self, name: str, identity: Identity) -> ImageVersion:
        """The version of *name*'s image file with *identity*: the last one, or a new one."""
        last = self._versions.get(name)
        if last is not None and last.identity == identity:
            return last
        new = self._versions[name] = ImageVersion(self.prefixes.new(), identity)
        self._record(name, new)
        if last is not None:
            log.info("%s: image file changed since its last mount; new inode numbers", name)
            self.version_changed(name)
        return new

    async def detach(self, mount: Mount) -> None:
        """Unmount *mount*; lazily if it is still busy. Raises `MountError`."""
        try:
            await self.backend.unmount(mount.backing)
        except UnmountFailed as exc:
            if "busy" not in str(exc).lower():
                raise
            log.info("%s: backing mount still busy (handles forgotten by release); "
                     "detaching it lazily", mount.name)
            await self.backend.unmount(mount.backing, lazy=True)

    def still_mounted(self, mount: Mount) -> bool:
        return self.backend.mounted(mount.backing) is not None

    def adopted(self, name: str, path: Path | None, identity: Identity | None, backing: Path,
                source: str, device: int, mounted_at: float | None) -> Mount:
        """The `Mount` of a backing mount found at start-up (see recovery.py).

        Its version is what is really mounted: the kernel names the file behind a loop device
        by device and inode number, also after that file was replaced. A mount that cannot be
        paired with the image file now at *path* gets a version of its own that no file will
        ever match, so content mounted later is never served under its inode numbers.
        """
        mounted = loop.backing_identity(source) if source.startswith("/dev/loop") else None
        if identity is None or (mounted is not None and identity[:2] != mounted):
            identity = self._identity_of_mounted(path, mounted)
        if path is not None:
            self.paths[name] = path
        return self._mount(name, path or Path(), backing, self.version(name, identity), source,
                           device, mounted_at or time.time())

    def _mount(self, name: str, path: Path, backing: Path, version: ImageVersion, source: str,
               device: int, mounted_at: float | None = None) -> Mount:
        return Mount(name, path, backing, version, source, mounted_at or time.time(),
                     self.storage.guarded(version.identity[0]), device)

    @staticmethod
    def _identity_of_mounted(path: Path | None, mounted: tuple[int, int] | None) -> Identity:
        try:
            now = identity_of(path) if path is not None else None
        except OSError:
            now = None
        if now is not None and mounted is not None and now[:2] == mounted:
            return now  # the file at path is the one mounted (images are never rewritten)
        dev, ino = mounted or (0, 0)
        return (dev, ino, -1, -1)  # a size of -1: no file's identity
