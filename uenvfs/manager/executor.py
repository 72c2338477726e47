"""What each `.control` command does: one handler per command type of `control.COMMANDS`."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..core.control import (
    Acquire,
    Command,
    Emergency,
    Expire,
    ForceUnmount,
    HoldTime,
    Reconcile,
    Release,
    Reload,
    Restart,
    Verify,
)
from ..core.errors import CommandError, JournalWriteFailed, MountError
from ..core.settings import Settings
from .counts import Counts
from .images import Images
from .manager import Manager
from .reconfigure import Reconfigure

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Command)
Handler = Callable[["Executor", C], Awaitable[str]]

HANDLERS: dict[type[Command], Handler[Any]] = {}  # by command type


def handles(kind: type[C]) -> Callable[[Handler[C]], Handler[C]]:
    """Register the decorated method as the handler of the command type *kind*."""
    def register(handler: Handler[C]) -> Handler[C]:
        HANDLERS[kind] = handler
        return handler

    return register


class Executor:
    """Applies `.control` commands: to the lifecycle (`manager`), the use counts (`counts`),
    the settings, and the configuration (`reconfigure`); `images` says what a word names.
    The daemon makes it; the filesystem reaches it as a `CommandService`.

    Invariant: force-unmount happens only while `settings.emergency` is on.
    """

    def __init__(
        self,
        manager: Manager,
        counts: Counts,
        images: Images,
        settings: Settings,
        reconfigure: Reconfigure,
    ) -> None:
        self.manager = manager
        self.counts = counts
        self.images = images
        self.settings = settings
        self.reconfigure = reconfigure

    async def execute(self, command: Command) -> str:
        """Apply one command. Returns a short outcome; raises `CommandError`."""
        try:
            return await HANDLERS[type(command)](self, command)
        except JournalWriteFailed as exc:
            raise CommandError(errno.EIO, str(exc)) from exc

    @handles(Acquire)
    async def acquire(self, cmd: Acquire) -> str:
        name = await self.images.image(cmd.name)
        while True:
            try:
                await self.manager.ensure_mounted(name)
            except MountError as exc:
                raise CommandError(errno.EIO, str(exc)) from exc
            new = await self.counts.acquire(name, cmd.alloc, cmd.uid)
            if new is not None:
                return "acquired" if new else "already acquired"

    @handles(Release)
    async def release(self, cmd: Release) -> str:
        counts = self.counts
        try:
            name = None if cmd.name is None else await self.images.image(cmd.name)
        except CommandError as exc:
            swapped = cmd.name in counts.allocations() and await self.images.known(cmd.alloc)
            if exc.errno == errno.ENOENT and swapped:
                raise CommandError(errno.ENOENT, f"{exc}; did you mean 'release "
                                   f"{cmd.name} {cmd.alloc}'? (release takes the allocation "
                                   "first)") from exc
            raise
        names = None if name is None else [name]
        if name is not None and cmd.alloc not in counts.users(name):
            raise CommandError(errno.ENOENT, f"{cmd.alloc} does not use {cmd.name}")
        left = await counts.release(cmd.alloc, names)
        if not left:
            raise CommandError(errno.ENOENT, f"no image is used by {cmd.alloc}")
        return "released from " + ", ".join(left)

    @handles(Reconcile)
    async def reconcile(self, cmd: Reconcile) -> str:
        dropped = await self.counts.reconcile(cmd.allocs)
        for name, alloc in dropped:
            log.info("reconcile: %s no longer live, released from %s", alloc, name)
        return f"released {len(dropped)} stale uses"

    @handles(Expire)
    async def expire(self, cmd: Expire) -> str:
        if cmd.name is None:
            return await self.manager.expire_idle()
        name = await self.images.image(cmd.name)
        refcount = len(self.counts.users(name))
        if refcount:
            raise CommandError(errno.EPERM, f"{cmd.name} is in use by {refcount} allocations")
        return await self.manager.expire([name])

    @handles(HoldTime)
    async def hold_time(self, cmd: HoldTime) -> str:
        name = None if cmd.name is None else await self.images.image(cmd.name)
        self.settings.set_hold_time(cmd.seconds, name)
        self.manager.hold_times_changed()
        await self.manager.durable()  # it outlives a restart, as an acquisition does
        return f"hold time {cmd.seconds:g} s"

    @handles(Emergency)
    async def emergency_mode(self, cmd: Emergency) -> str:
        self.settings.emergency = cmd.on
        if cmd.on:
            log.warning("emergency mode ON: force-unmount is allowed")
        else:
            log.info("emergency mode off")
        await self.manager.durable()  # it outlives a restart, as an acquisition does
        return "emergency " + ("on" if cmd.on else "off")

    @handles(ForceUnmount)
    async def force_unmount(self, cmd: ForceUnmount) -> str:
        if not self.settings.emergency:
            raise CommandError(errno.EPERM, "force-unmount is only allowed in emergency mode")
        return await self.manager.force_unmount(await self.images.image(cmd.name))

    @handles(Reload)
    async def reload(self, cmd: Reload) -> str:
        return await self.reconfigure.reload()

    @handles(Restart)
    async def restart(self, cmd: Restart) -> str:
        return await self.reconfigure.restart()

    @handles(Verify)
    async def verify(self, cmd: Verify) -> str:
        return await self.manager.verify()
