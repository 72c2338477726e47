"""A leaner event-loop glue for pyfuse3's request loop.

pyfuse3 runs each FUSE request through two trio primitives: a `trio.Lock` that lets one worker
at a time wait for /dev/fuse, and `trio.lowlevel.wait_readable` on it. Both always go through
trio's scheduler (an uncontended `Lock.acquire` still checkpoints; `wait_readable` re-arms
epoll), which costs about as much as the request itself: a no-op pyfuse3 filesystem measured
~130 us per open+close pair here (median of 8 x 2,000), ~75 us with this module. (Waiting in a
blocking poll(2) instead of trio's epoll when idle measured no better: ~85 us.)

pyfuse3 looks both up through its module attribute `pyfuse3.trio` (the hook its own asyncio
mode uses). `install()` points it at a facade that
  - returns from `wait_readable` at once when /dev/fuse already holds a request (a zero-timeout
    poll), and only otherwise waits through trio; after `BURST` such returns in a row it passes
    through a real checkpoint, so that timers, mounts and signals are never starved;
  - takes an uncontended lock without a checkpoint, and hands it over directly on release.
Everything else is trio's own. The ordering pyfuse3 relies on is unchanged: the worker that
saw the request readable releases the lock and reads it before any other worker runs.
"""

from __future__ import annotations

import select
import types
from typing import Any

import pyfuse3
import trio

BURST = 32  # requests served back to back before yielding to the other trio tasks


class _Poller:
    """Zero-timeout readability checks of pyfuse3's session fd."""

    def __init__(self) -> None:
        self._polls: dict[int, select.poll] = {}
        self.fast = 0  # returns in a row without a checkpoint

    def readable(self, fd: int) -> bool:
        poll = self._polls.get(fd)
        if poll is None:
            poll = self._polls[fd] = select.poll()
            poll.register(fd, select.POLLIN)
        return bool(poll.poll(0))


_poller = _Poller()


async def wait_readable(fd: int) -> None:
    if _poller.fast < BURST and _poller.readable(fd):
        _poller.fast += 1
        return
    _poller.fast = 0
    await trio.lowlevel.wait_readable(fd)  # a checkpoint too, if a request is already there


class Lock:
    """The lock pyfuse3's workers take around waiting for a request (`async with` only).

    Free: taken without a checkpoint. Held: the caller parks, and `release` hands the lock to
    the first parked task.
    """

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            return
        await self._lot.park()  # woken by __aexit__, which keeps the lock held for us

    async def __aexit__(self, *exc: object) -> None:
        if not self._lot.unpark():
            self._held = False


class _Facade(types.ModuleType):
    """`trio`, as pyfuse3 sees it: trio itself but for the two pieces above."""

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


class _LowLevel(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)


def install() -> None:
    """Make pyfuse3 use the facade. Call before `pyfuse3.main()`."""
    facade = _Facade("uenvfs.fastloop.trio")
    lowlevel = _LowLevel("uenvfs.fastloop.trio.lowlevel")
    lowlevel.wait_readable = wait_readable  # type: ignore[attr-defined]
    facade.lowlevel = lowlevel  # type: ignore[attr-defined]
    facade.Lock = Lock  # type: ignore[attr-defined]
    pyfuse3.trio = facade  # type: ignore[attr-defined]
