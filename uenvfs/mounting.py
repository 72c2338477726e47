"""Making and removing one backing mount: the steps of a first access, and of an unmount.

The manager decides *when* (the state machine, one task per mount or unmount); this module
does the work: find the image file, tell its version, check it, mount it, detach it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import squashfs
from .backend import MountBackend, is_mount_point
from .catalog import Catalog
from .config import Config
from .errors import MountFailed, UnmountFailed
from .inodes import Identity, ImageVersion, InodePrefixes
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Mount:
    """A live backing mount of one version of an image."""

    name: str
    image_path: Path
    backing: Path
    version: ImageVersion
    source: str
    mounted_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.root = os.fsencode(self.backing)  # the backing directory, for path building


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
    ) -> None:
        self.config = config
        self.backend = backend
        self.catalog = catalog
        self.metrics = metrics
        self.prefixes = prefixes
        self.clock = clock
        self.version_changed = version_changed
        self.paths: dict[str, Path] = {}  # last known image path of each name
        self._versions: dict[str, ImageVersion] = {}  # the last one of each name

    async def mount(self, name: str) -> Mount:
        """Mount *name*'s image at its backing directory. Raises `MountError`."""
        path = await self.catalog.resolve(name)
        if path is None:
            raise MountFailed(f"{name} is no longer in any image source")
        self.paths[name] = path
        try:
            identity = identity_of(path)
        except OSError as exc:
            raise MountFailed(f"image {path}: {exc.strerror}") from exc
        target = self.config.backing_root / name
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MountFailed(f"cannot create {target}: {exc.strerror}") from exc
        version = self.version(name, identity)
        if self.config.validate and not version.validated:
            await self._validate(path)
            version.validated = True
        if is_mount_point(target):
            log.warning("%s: a stale mount sits at %s; detaching it first", name, target)
            await self.backend.unmount(target, lazy=True)
        await self.backend.mount(path, target)
        source = self.backend.mounted(target)
        if source is None:
            raise MountFailed(f"{self.backend.name} reported success but {target} is not mounted")
        return Mount(name, path, target, version, source)

    async def _validate(self, path: Path) -> None:
        """Refuse a corrupt image with a clear reason, before the kernel sees it."""
        started = self.clock()
        try:
            problem = await squashfs.check_image(path, self.config.mount_timeout)
        except OSError as exc:
            raise MountFailed(f"image {path}: {exc.strerror}") from exc
        self.metrics.observe("uenvfs_check_seconds", self.clock() - started)
        if problem is not None:
            raise MountFailed(f"image {path} is not valid: {problem}")

    def version(self, name: str, identity: Identity) -> ImageVersion:
        """The version of *name*'s image file with *identity*: the last one, or a new one."""
        last = self._versions.get(name)
        if last is not None and last.identity == identity:
            return last
        new = self._versions[name] = ImageVersion(self.prefixes.new(), identity)
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
                source: str, mounted_at: float | None) -> Mount:
        """The `Mount` of a backing mount found at start-up (see recovery.py)."""
        if identity is None:
            try:
                identity = identity_of(path) if path else (0, 0, 0, 0)
            except OSError:
                identity = (0, 0, 0, 0)
        if path is not None:
            self.paths[name] = path
        return Mount(name, path or Path(), backing, self.version(name, identity), source,
                     mounted_at or time.time())
