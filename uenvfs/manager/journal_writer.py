"""The journal writer: one task that writes the journal after changes, gathering bursts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import trio

from ..core.errors import JournalWriteFailed
from ..core.metrics import Metrics
from . import journal
from .journal import Journal

log = logging.getLogger(__name__)

DELAY = 0.05  # seconds a mount or unmount waits to be journaled (an acquisition: none)


class JournalWriter:
    """Writes the state that `snapshot` returns to the journal at `path`, in its own task.

    Every request for a write gets a generation number; `written` is the generation of the
    last snapshot written or tried, `saved` that of the last one on disk. Invariant:
    saved <= written <= wanted, and a snapshot taken for generation g covers every change
    made before g was handed out. A failed write is logged and counted
    (`uenvfs_journal_errors_total`); it fails the command that waited for it (`durable`), and
    is never fatal to the daemon: the mount table remains the authority for mounts.
    """

    def __init__(
        self,
        path: Path,
        snapshot: Callable[[], Journal],
        metrics: Metrics,
        *,
        in_thread: bool = True,
        delay: float = DELAY,
    ) -> None:
        self.path = path
        self.snapshot = snapshot
        self.metrics = metrics
        # The fsync goes to a worker thread; tests in virtual time write in the loop instead
        # (trio's autojump clock would jump while the thread works).
        self.in_thread = in_thread
        self.delay = delay
        self.wanted = self.written = self.saved = 0  # generations
        self.error = ""  # why the last write failed ("" if it did not)
        self._urgent = False
        self._wake = trio.Event()
        self._done = trio.Event()

    def save(self, state: Journal | None = None) -> bool:
        """Write *state* (default: a snapshot) now, in the caller's thread; False if it failed."""
        try:
            journal.save(self.path, state or self.snapshot())
        except OSError as exc:
            self.metrics.inc("uenvfs_journal_errors_total")
            self.error = exc.strerror or str(exc)
            log.warning("cannot write the journal %s: %s", self.path, self.error)
            return False
        self.error = ""
        return True

    def soon(self) -> int:
        """Have the current state written shortly; returns its generation.

        A mount need not wait for its journal entry (the mount table says it exists, and a
        crash before the write only loses nothing the table cannot tell), so the fsync stays
        out of the path of the first access.
        """
        self.wanted += 1
        self._wake.set()
        return self.wanted

    async def durable(self) -> None:
        """Write the current state and wait until it is on disk (an acquisition must be).

        Raises `JournalWriteFailed` if the write failed: the change stays in force in the
        daemon, but would not survive a restart.
        """
        self._urgent = True
        wanted = self.soon()
        while self.written < wanted:
            await self._done.wait()
        if self.saved < wanted:
            raise JournalWriteFailed(f"cannot write the journal {self.path}: {self.error}; "
                                     "the change is in force but would not survive a restart")

    async def run(self) -> None:
        """Write the journal whenever asked, until cancelled."""
        while True:
            await self._wake.wait()
            if not self._urgent:
                # Let the access that mounted finish first, and gather a burst of changes.
                await trio.sleep(self.delay)
            self._urgent = False
            self._wake = trio.Event()
            generation = self.wanted
            state = self.snapshot()  # taken in the loop
            if self.in_thread:
                ok = await trio.to_thread.run_sync(self.save, state)
            else:
                ok = self.save(state)
            self.written = generation
            if ok:
                self.saved = generation
            done, self._done = self._done, trio.Event()
            done.set()
