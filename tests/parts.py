"""The manager's side of a server, made and wired as the daemon makes it, for tests without a
FUSE mount (a fake backend, virtual time)."""

from __future__ import annotations

from dataclasses import dataclass

from uenvfs.core.config import Config
from uenvfs.core.model import InodePrefixes
from uenvfs.core.settings import Settings
from uenvfs.image.catalog import Catalog
from uenvfs.manager.backend import MountBackend
from uenvfs.manager.executor import Executor
from uenvfs.manager.images import Images
from uenvfs.manager.manager import Manager
from uenvfs.manager.reconfigure import Reconfigure


@dataclass
class Parts:
    """The manager, what the filesystem sees of it, and what `.control` commands go to."""

    manager: Manager
    images: Images
    executor: Executor
    settings: Settings


def make_parts(config: Config, backend: MountBackend, catalog: Catalog,
               prefixes: InodePrefixes | None = None) -> Parts:
    """The parts, with file I/O in the loop (trio's autojump clock must not jump meanwhile)."""
    settings = Settings(config.hold_time)
    manager = Manager(config, backend, catalog, settings, threads=False, prefixes=prefixes)
    images = Images(manager, catalog, settings)
    executor = Executor(manager, manager.counts, images, settings,
                        Reconfigure(manager, catalog, settings))
    return Parts(manager, images, executor, settings)
