"""What each `.control` command does: one handler per command type of `control.COMMANDS`."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

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
from ..core.labels import LabelError, parse_label

if TYPE_CHECKING:
    from .manager import Manager

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


def _is_label(word: str) -> bool:
    try:
        parse_label(word)
    except LabelError:
        return False
    return True


class Executor:
    """Applies `.control` commands to the manager.

    Invariant: force-unmount happens only while `emergency` is on.
    """

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.emergency = False

    async def execute(self, command: Command) -> str:
        """Apply one command. Returns a short outcome; raises `CommandError`."""
        try:
            return await HANDLERS[type(command)](self, command)
        except JournalWriteFailed as exc:
            raise CommandError(errno.EIO, str(exc)) from exc

    async def _image(self, word: str) -> str:
        """The image that *word* names: an image name, or a label (listed, partial, sha256
        or id) of a repository's image. ENOENT if none; EINVAL if a label is ambiguous."""
        manager = self.manager
        if not (manager.registry.images.get(word) or manager.catalog.remembers(word)):
            try:
                target = manager.catalog.label(word)
            except LabelError as exc:
                if _is_label(word):  # ambiguous
                    raise CommandError(errno.EINVAL, str(exc)) from exc
                target = None  # a name that is no label (of a program map, say)
            if target is not None:
                return target
        if not await self.manager.known(word):
            labels = " and no uenv label matches it" if manager.catalog.records() else ""
            raise CommandError(errno.ENOENT, f"no image named {word!r}{labels}")
        return word

    @handles(Acquire)
    async def acquire(self, cmd: Acquire) -> str:
        manager = self.manager
        name = await self._image(cmd.name)
        while True:
            try:
                await manager.ensure_mounted(name)
            except MountError as exc:
                raise CommandError(errno.EIO, str(exc)) from exc
            image = manager.registry[name]
            if image.is_mounted:
                new = image.acquire(cmd.alloc, manager.clock())
                await manager.journal.durable()
                return "acquired" if new else "already acquired"

    @handles(Release)
    async def release(self, cmd: Release) -> str:
        manager = self.manager
        try:
            name = None if cmd.name is None else await self._image(cmd.name)
        except CommandError as exc:
            swapped = cmd.name in manager.registry.allocations() and await manager.known(cmd.alloc)
            if exc.errno == errno.ENOENT and swapped:
                raise CommandError(errno.ENOENT, f"{exc}; did you mean 'release "
                                   f"{cmd.name} {cmd.alloc}'? (release takes the allocation "
                                   "first)") from exc
            raise
        names = None if name is None else [name]
        if name is not None and cmd.alloc not in manager.registry[name].users:
            raise CommandError(errno.ENOENT, f"{cmd.alloc} does not use {cmd.name}")
        left = manager.registry.release(cmd.alloc, manager.clock(), names)
        if not left:
            raise CommandError(errno.ENOENT, f"no image is used by {cmd.alloc}")
        manager.timer.wake()
        await manager.journal.durable()
        return "released from " + ", ".join(left)

    @handles(Reconcile)
    async def reconcile(self, cmd: Reconcile) -> str:
        manager = self.manager
        dropped = manager.registry.reconcile(cmd.allocs, manager.clock())
        for name, alloc in dropped:
            log.info("reconcile: %s no longer live, released from %s", alloc, name)
        manager.timer.wake()
        await manager.journal.durable()
        return f"released {len(dropped)} stale uses"

    @handles(Expire)
    async def expire(self, cmd: Expire) -> str:
        if cmd.name is None:
            return await self.manager.expire_idle()
        name = await self._image(cmd.name)
        image = self.manager.registry[name]
        if image.refcount:
            raise CommandError(errno.EPERM,
                               f"{cmd.name} is in use by {image.refcount} allocations")
        return await self.manager.expire([name])

    @handles(HoldTime)
    async def hold_time(self, cmd: HoldTime) -> str:
        manager = self.manager
        if cmd.name is None:
            manager.registry.hold_time = manager.hold_time_set = cmd.seconds
        else:
            manager.registry[await self._image(cmd.name)].hold_time = cmd.seconds
        manager.timer.wake()
        await manager.journal.durable()  # it outlives a restart, as an acquisition does
        return f"hold time {cmd.seconds:g} s"

    @handles(Emergency)
    async def emergency_mode(self, cmd: Emergency) -> str:
        self.emergency = cmd.on
        if self.emergency:
            log.warning("emergency mode ON: force-unmount is allowed")
        else:
            log.info("emergency mode off")
        await self.manager.journal.durable()  # it outlives a restart, as an acquisition does
        return "emergency " + ("on" if self.emergency else "off")

    @handles(ForceUnmount)
    async def force_unmount(self, cmd: ForceUnmount) -> str:
        if not self.emergency:
            raise CommandError(errno.EPERM, "force-unmount is only allowed in emergency mode")
        return await self.manager.force_unmount(await self._image(cmd.name))

    @handles(Reload)
    async def reload(self, cmd: Reload) -> str:
        return await self.manager.reload()

    @handles(Restart)
    async def restart(self, cmd: Restart) -> str:
        return await self.manager.restart()

    @handles(Verify)
    async def verify(self, cmd: Verify) -> str:
        return await self.manager.verify()

