"""A leaner event-loop glue for pyfuse3's request loop.

pyfuse3 runs each FUSE request through two trio primitives: a `trio.Lock` that lets one worker
at a time wait for /dev/fuse, and `trio.lowlevel.wait_readable` on it. Both always go through
trio's scheduler (an uncontended `Lock.acquire` still checkpoints; `wait_readable` re-arms
epoll), which costs more than most requests themselves. Measured here with a no-op pyfuse3
filesystem, open+close of one file in a loop: ~110-150 us per pair with trio as pyfuse3 uses
it, ~60 us with this module (uenvfs itself: ~90 us without lingering, ~65 us with 100 us).

pyfuse3 looks both up through its module attribute `pyfuse3.trio` (the hook its own asyncio
mode uses). `installed()` points it at a facade that
  - returns from `wait_readable` at once when /dev/fuse already holds a request (a zero-timeout
    poll), and only otherwise waits through trio; after `BURST` such returns in a row it passes
    through a real checkpoint, so that timers, mounts and signals are never starved;
  - before it waits through trio, keeps polling for up to `linger` seconds: a process that
    walks or opens files sends its next request a few microseconds after our answer, and
    catching it while still running saves two wakeups across CPUs (on this VM that is a third
    of a request's cost: `find` over 12,794 files 0.24 s -> 0.14 s). It costs CPU only right
    after a request, never while idle;
  - takes an uncontended lock without a checkpoint, and hands it over only when the worker
    that released it yields to the scheduler (see `Lock`).
Everything else is trio's own. The ordering pyfuse3 relies on is unchanged: the worker that
saw the request readable releases the lock and reads it before any other worker runs.

This leans on pyfuse3's private loop (`_wait_fuse_readable` and `_session_loop`), which is the
same in every release from 3.3.0 to 3.5.0 (read in their sources; 3.4.1 onwards only creates
the lock lazily, at the first wait instead of in `init()`). `installed()` puts the facade in
place for the length of a `with` block, and only over a release and a trio it knows
(`unsupported()`); over any other it leaves pyfuse3 on its own, slower loop, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
import types
from collections.abc import Iterator
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)

BURST = 32  # requests served back to back before yielding to the other trio tasks
LINGER = 100e-6  # default seconds to keep polling for the next request before sleeping

# The pyfuse3 releases whose request loop this module was written against (their sources read).
KNOWN_PYFUSE3 = ("3.3.0", "3.4.0", "3.4.2", "3.5.0")
# What this module itself takes from trio (pyfuse3 takes the rest of trio through the facade).
TRIO_PARTS = (
    "abc.Instrument.after_task_step", "lowlevel.add_instrument", "lowlevel.current_task",
    "lowlevel.ParkingLot.park", "lowlevel.ParkingLot.unpark", "lowlevel.ParkingLot.__len__",
    "lowlevel.wait_readable",
)


class _Poller:
    """Readability checks of pyfuse3's session fd that do not go through trio."""

    def __init__(self) -> None:
        self._polls: dict[int, select.poll] = {}
        self.fast = 0  # returns in a row without a checkpoint
        self.linger = 0.0

    def readable(self, fd: int) -> bool:
        poll = self._polls.get(fd)
        if poll is None:
            poll = self._polls[fd] = select.poll()
            poll.register(fd, select.POLLIN)
        return bool(poll.poll(0))

    def ready(self, fd: int) -> bool:
        """Whether *fd* is readable now or becomes readable within `linger` seconds."""
        if self.readable(fd):
            return True
        if self.linger <= 0:
            return False
        end = time.perf_counter() + self.linger
        while time.perf_counter() < end:
            if self.readable(fd):
                return True
        return False


_poller = _Poller()


async def wait_readable(fd: int) -> None:
    if _poller.fast < BURST and _poller.ready(fd):
        _poller.fast += 1
        return
    _poller.fast = 0
    await trio.lowlevel.wait_readable(fd)  # a checkpoint too, if a request is already there


class Lock:
    """The lock pyfuse3's workers take around waiting for a request (`async with` only).

    Free: taken without a checkpoint. Held: the caller parks. Released while others are
    parked: the lock stays free for the releasing worker, which goes on to read the request,
    answers it (most handlers never wait) and comes back for the lock, all in one step of
    trio's. Only if that worker yields to the scheduler before it is back (its handler waits
    for a mount, say) does the lock pass to the first parked task, right after that step.
    So one worker serves a run of quick requests alone, and the parked ones cost nothing.
    """

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()
        self._released_by: trio.lowlevel.Task | None = None
        trio.lowlevel.add_instrument(_Handover(self))

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            self._released_by = None
            return
        await self._lot.park()  # woken by handover(), which keeps the lock held for us

    async def __aexit__(self, *exc: object) -> None:
        self._held = False
        if self._lot:
            self._released_by = trio.lowlevel.current_task()

    def after_step(self, task: trio.lowlevel.Task) -> None:
        """*task* yielded to the scheduler (or ended): if it released the lock and has not
        taken it back, hand the lock to the first parked task."""
        if task is self._released_by:
            self._released_by = None
            if not self._held:
                self._held = True
                if not self._lot.unpark():
                    self._held = False


class _Handover(trio.abc.Instrument):
    def __init__(self, lock: Lock) -> None:
        self.lock = lock

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.lock.after_step(task)


class _Facade(types.ModuleType):
    """`trio`, as pyfuse3 sees it: trio itself but for the two pieces above."""

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


class _LowLevel(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)


def unsupported(fuse: types.ModuleType, trio_module: types.ModuleType) -> str | None:
    """Why the facade cannot run over *fuse* (pyfuse3) and *trio_module* (one line), or None."""
    version = getattr(fuse, "__version__", "unknown")
    if version not in KNOWN_PYFUSE3:
        return (f"pyfuse3 {version} is not a release whose request loop uenvfs knows "
                f"({', '.join(KNOWN_PYFUSE3)})")
    if getattr(fuse, "trio", None) is not trio_module:
        return "pyfuse3 does not reach trio through pyfuse3.trio (or it was replaced already)"
    for part in TRIO_PARTS:
        found: object = trio_module
        for name in part.split("."):
            found = getattr(found, name, None)
        if found is None:
            return f"trio {getattr(trio_module, '__version__', 'unknown')} has no trio.{part}"
    return None


def _facade() -> types.ModuleType:
    facade = _Facade("uenvfs.fuse.fastloop.trio")
    lowlevel = _LowLevel("uenvfs.fuse.fastloop.trio.lowlevel")
    lowlevel.wait_readable = wait_readable  # type: ignore[attr-defined]
    facade.lowlevel = lowlevel  # type: ignore[attr-defined]
    facade.Lock = Lock  # type: ignore[attr-defined]
    return facade


@contextlib.contextmanager
def installed(linger: float = LINGER) -> Iterator[bool]:
    """pyfuse3 on the facade inside the block, polling *linger* seconds before it sleeps (0:
    never); yields whether it is. On the way out, also on error, pyfuse3's `trio` and this
    module's poller are again what they were.

    Enter before `pyfuse3.init()` (releases before 3.4.1 make their lock there). Over a pyfuse3
    or trio that `unsupported()` rejects, logs a warning and changes nothing: pyfuse3's own
    loop serves as well, only slower, so a node whose pyfuse3 was upgraded still serves."""
    global _poller
    reason = unsupported(pyfuse3, trio)
    if reason is not None:
        log.warning("%s: serving with pyfuse3's own request loop (slower)", reason)
        yield False
        return
    saved = pyfuse3.trio, _poller  # type: ignore[attr-defined]
    _poller = _Poller()
    _poller.linger = linger
    pyfuse3.trio = _facade()  # type: ignore[attr-defined]
    try:
        yield True
    finally:
        pyfuse3.trio, _poller = saved  # type: ignore[attr-defined]
