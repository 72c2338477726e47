"""`reload` and `restart`: the configuration file read again, and what it may change.

A reload (`reload`, SIGHUP) applies the keys that can change live (`config.LIVE`) to the
manager, the catalog and the settings, and reads the image sources again. A restart (`uenvfs
restart`, `systemctl reload uenvfs`) asks the keeper for a new server, which reads the file
itself; it is refused if the file changes what only a stop and start can (`config.CONNECTION`).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Collection

import trio

from ..core import config as config_mod
from ..core.config import Config, ConfigError
from ..core.errors import CommandError
from ..core.settings import Settings
from ..image.catalog import Catalog
from .manager import Manager

log = logging.getLogger(__name__)


class Reconfigure:
    """Reloads the configuration into *manager*, *catalog* and *settings*, and asks for a
    restart.

    *reread* reads the configuration file again, with the command line's flags (None: there
    is no file, a reload re-reads the sources only); *restarter* asks the keeper for a new
    server (None: no keeper, a restart is refused).
    """

    def __init__(
        self,
        manager: Manager,
        catalog: Catalog,
        settings: Settings,
        reread: Callable[[], Config] | None = None,
        restarter: Callable[[], None] | None = None,
    ) -> None:
        self.manager = manager
        self.catalog = catalog
        self.settings = settings
        self.reread = reread
        self.restarter = restarter

    async def restart(self) -> str:
        """Have a new server started from the installed code take over (see keeper/keeper.py).

        Refused (EINVAL) if the configuration file changes what only a stop and start can
        (`config.CONNECTION`): the new server would serve the old connection with them. (A
        file that cannot be used is the new server's to refuse: it exits, and the restart
        fails with `restart_error` in `.status`.)"""
        if self.restarter is None:
            raise CommandError(errno.EOPNOTSUPP, "this server has no keeper to restart it")
        try:
            read = await self._read_config()
        except ConfigError:
            read = None  # the new server's to refuse
        if read is not None and read[1].connection:
            raise CommandError(errno.EINVAL, "the configuration changes what only a stop and "
                               f"start of uenvfs can: {'; '.join(read[1].connection)}; "
                               "no restart")
        self.restarter()
        return "a new server takes over once it is ready"

    async def reload(self) -> str:
        """Re-read the configuration file, apply what can change live, then re-read the
        image sources. A configuration that cannot be used changes nothing (EINVAL)."""
        configured = await self._reconfigure()
        return configured + await self._reread_sources()

    async def _read_config(self) -> tuple[Config, config_mod.Changes] | None:
        """The configuration file read again (in a thread), and how it differs from the one in
        force; None without a file to read. Raises `ConfigError`."""
        if self.reread is None:
            return None
        new = await trio.to_thread.run_sync(self.reread)
        old = self.manager.config
        return new, config_mod.changes(config_mod.as_json(old), config_mod.as_json(new))

    async def _reconfigure(self) -> str:
        try:
            read = await self._read_config()
        except ConfigError as exc:
            raise CommandError(errno.EINVAL, f"{exc}; nothing changed") from exc
        if read is None:
            return ""
        new, found = read
        if found.live:
            self._apply(new, found.keys("live"))
            log.info("reload: configuration applied: %s", "; ".join(found.live))
        if found.restart:
            log.warning("reload: configuration changes that take a new server (uenvfs "
                        "restart, or systemctl reload uenvfs): %s", "; ".join(found.restart))
        if found.connection:
            log.warning("reload: configuration changes that take a stop and start of uenvfs "
                        "(it unmounts: release every image first): %s",
                        "; ".join(found.connection))
        waiting = len(found.restart) + len(found.connection)
        return (f"configuration: {len(found.live)} changes applied"
                + (f", {waiting} need a restart (see the log)" if waiting else "") + "; ")

    def _apply(self, new: Config, keys: Collection[str]) -> None:
        """Take the live keys of *new* (`config.LIVE`) that changed, *keys*."""
        config = config_mod.live_part(self.manager.config, new)
        self.manager.configure(config)
        self.catalog.configure(config)
        if "hold_time" in keys:
            replaced = self.settings.configure(config.hold_time)
            if replaced is not None:
                log.info("the configured hold time replaces the one set by hold-time (%g s)",
                         replaced)
            self.manager.hold_times_changed()
        if "log_level" in keys:
            logging.getLogger().setLevel(config.log_level.upper())

    async def _reread_sources(self) -> str:
        catalog = self.catalog
        before, links = set(catalog.listing()), catalog.aliases()
        if await catalog.reread() is None:
            raise CommandError(errno.EIO, f"image sources gave no answer in "
                               f"{catalog.source_timeout:g} s; kept the listing of "
                               f"{len(before)} images")
        after, now = set(catalog.listing()), catalog.aliases()
        moved = {name for name in links.keys() | now.keys() if links.get(name) != now.get(name)}
        self.manager.sources_changed((before ^ after) | moved)
        return f"{len(after)} images ({len(after - before)} added, {len(before - after)} removed)"
