"""The hold timer: one task that starts the unmount of every image idle for its hold time."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

from ..core.registry import Registry
from ..core.state import Image

log = logging.getLogger(__name__)


class HoldTimer:
    """Sleeps until the earliest deadline of the registry's hold timers, then expires what is due.

    Invariant: while `run` waits, `sleeping_until` is the deadline it waits for (inf if none).
    A deadline can only come sooner through a change of the registry (a use ended, a hold time
    shrank, an image got mounted): whoever makes it calls `wake` (deadlines may have changed)
    or `wake_for` (this image may have started its timer). A deadline that moved later needs
    no wake-up: at the old one, nothing is due and the timer sleeps again.
    """

    def __init__(
        self,
        registry: Registry,
        unmount: Callable[[str], None],
        clock: Callable[[], float] = trio.current_time,
        check: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.unmount = unmount  # starts the unmount of an image its timer expired
        self.clock = clock
        self.check = check  # counts the uses FUSE does not see, before anything is unmounted
        self.sleeping_until = math.inf
        self._wakeup = trio.Event()

    async def run(self) -> None:
        """Expire images as their timers run out, until cancelled."""
        while True:
            self._wakeup = trio.Event()
            deadline = self.registry.next_deadline()
            self.sleeping_until = math.inf if deadline is None else deadline
            with trio.move_on_at(self.sleeping_until):
                await self._wakeup.wait()
            now = self.clock()
            if self.check is not None and self.registry.due(now):
                await self.check()  # a process sitting in an image keeps it
                now = self.clock()
            for image in self.registry.due(now):
                hold_time = self.registry.hold_time_of(image)
                if image.expire(now, hold_time):
                    log.info("%s: hold time %.3g s over, unmounting", image.name, hold_time)
                    self.unmount(image.name)

    def wake(self) -> None:
        """Deadlines may have changed: look again."""
        self._wakeup.set()

    def wake_for(self, image: Image) -> None:
        """*image* may have started its timer: wake up if it must run out sooner."""
        deadline = self.registry.deadline(image)
        if deadline is not None and deadline < self.sleeping_until:
            self._wakeup.set()
