"""The images as the filesystem and the commands see them: `ImageService` (core/interfaces.py).

Made of the manager's parts. What the lifecycle answers (`mounted`, `ensure_mounted`, ...)
and the use counts are the manager's and its counts' own methods, bound once: the FUSE side
asks `mounted` on every request (the manager's dict of serving mounts answers it, with its
own `get`) and calls `open` and `close` on every open and release, so no call comes in
between. Names come from the catalog and the images' states; the `.status` document from
the states, the settings and the process serving.
"""

from __future__ import annotations

import errno
import operator
from collections.abc import Collection
from typing import Any

from ..core.errors import CommandError
from ..core.labels import LabelError, labels_by_id, parse_label
from ..core.settings import Settings
from ..core.state import Phase
from ..core.status import Server, mount_statuses, status_document
from ..image.catalog import Catalog
from .manager import Manager


class Images:
    """The `ImageService` of the filesystem, over *manager* and *catalog*; the commands ask
    it what a word names (`image`).

    Invariant: it keeps no state of its own and changes none but through the manager's
    counts; every answer is the manager's, the catalog's or the settings' as of the call.
    """

    def __init__(
        self, manager: Manager, catalog: Catalog, settings: Settings, server: Server | None = None
    ) -> None:
        self.manager = manager
        self.catalog = catalog
        self.settings = settings
        self.server = server  # the process serving, for `.status` (None: none, as in tests)
        self.metrics = manager.metrics
        self.mounted = manager.mounts.get  # `Manager.mounts` is never replaced
        self.serving = manager.mounts.values
        self.ensure_mounted = manager.ensure_mounted
        self.spawn = manager.spawn
        counts = manager.counts
        self.open, self.transfer, self.close = counts.open, counts.transfer, counts.close
        self.scanned, self.scanned_uses = counts.scanned, counts.scanned_uses
        self.disconnected = counts.disconnected
        self.tree_handed = counts.tree_handed  # for the query socket's `tree`

    def has_backing_mount(self, name: str) -> bool:
        """Whether a backing mount of *name* exists (serving, or being unmounted)."""
        return name in self.manager.backing_mounts

    # -- names ---------------------------------------------------------------------------

    def listed_names(self) -> Collection[str]:
        """The names the mount root lists: those of the listable image sources."""
        return self.catalog.listing().keys()

    def alias_of(self, name: str) -> str | None:
        """The image that the label name *name* stands for (a symlink in the root), or None."""
        return self.catalog.alias(name)

    def aliases(self) -> dict[str, str]:
        """Every label name the root lists, with the image it stands for."""
        return self.catalog.aliases()

    async def known(self, name: str, uid: int = 0) -> bool:
        """Whether *name* is an image: in a source now, or still mounted or listed. *uid* asks
        (a program map's time is shared out between users)."""
        image = self.manager.registry.images.get(name)
        if (image is not None and image.phase is not Phase.UNMOUNTED) or self.alias_of(name):
            return True
        refused = self.catalog.refused
        path = await self.catalog.resolve(name, uid)
        if self.catalog.refused > refused:
            self.metrics.inc("uenvfs_program_map_refused_total", uid=str(uid))
            self.metrics.inc("uenvfs_program_map_refusals_total")
        return path is not None

    async def image(self, word: str) -> str:
        """The image that *word* names in a command: an image name, or a label (listed,
        partial, sha256 or id) of a repository's image. `CommandError`: ENOENT if none,
        EINVAL if a label is ambiguous."""
        catalog = self.catalog
        named = (word in self.manager.registry.images or word in self.settings.hold_times
                 or catalog.remembers(word))  # used as an image's name: not a label
        if not named:
            try:
                target = catalog.label(word)
            except LabelError as exc:
                if _is_label(word):  # ambiguous
                    raise CommandError(errno.EINVAL, str(exc)) from exc
                target = None  # a name that is no label (of a program map, say)
            if target is not None:
                return target
        if not await self.known(word):
            labels = " and no uenv label matches it" if catalog.records() else ""
            raise CommandError(errno.ENOENT, f"no image named {word!r}{labels}")
        return word

    # -- .status and the query socket --------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The `.status` document."""
        manager, config, settings = self.manager, self.manager.config, self.settings
        mounts = mount_statuses(
            manager.registry, manager.clock(), mountpoint=config.mountpoint,
            backing_root=config.backing_root, image_paths=manager.mounter.paths,
            mounts=manager.backing_mounts, labels=labels_by_id(self.catalog.records()))
        return status_document(str(config.mountpoint), settings.hold_time, settings.emergency,
                               mounts, settings.verify, self.server)

    def acquired_by(self, alloc: str) -> list[dict[str, Any]]:
        """The images *alloc* acquired, by name: each one's image file, state and error (as
        in `.status`), for the query socket's `allocation`."""
        paths = self.manager.mounter.paths
        acquired = [image for image in self.manager.registry.users_of(alloc)
                    if image.users[alloc].acquired]
        return [{"name": image.name, "image_path": str(paths.get(image.name, "")),
                 "state": image.phase.value, "error": image.error}
                for image in sorted(acquired, key=operator.attrgetter("name"))]

    def status_version(self) -> object:
        """A value (compared with ==) that changes whenever `status` changes, but for the
        hold times still to run (they change with time): every event of an image counts in
        the registry's changes (a mount, an unmount, a use that begins or ends, a scan's
        counts); the rest is what the document shows of the settings, the server and the
        repositories' labels (the same records are the same tuple: compared at once)."""
        settings = self.settings
        server = self.server
        return (self.manager.registry.changes.count, settings.hold_time, settings.emergency,
                tuple(settings.hold_times.items()), settings.verify,
                None if server is None else server.restart_error, self.catalog.records())


def _is_label(word: str) -> bool:
    try:
        parse_label(word)
    except LabelError:
        return False
    return True
