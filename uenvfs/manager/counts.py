"""The uses of every image, counted in the state machine: the handles the filesystem opens,
the acquisitions made by command, and the processes a scan finds sitting in images.

A use that ends may start an image's hold timer, so the timer is told whenever one ends.
Acquisitions and releases are in the journal before they are answered; handles are not
(they die with the connection; a resumed connection has them in the ledger).

The owners of allocations (core/owners.py) are kept for the allocations in use: an
acquisition may name one, and an allocation whose last use ends is forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping

import trio

from ..core.errors import RefcountInconsistency
from ..core.metrics import Metrics
from ..core.owners import Owners
from ..core.state import Registry, Use
from .hold_timer import HoldTimer
from .journal_writer import JournalWriter

log = logging.getLogger(__name__)

TREE_GRACE = 10.0  # seconds a tree handed out counts for its allocation (see tree_handed)


class Counts:
    """Counts uses in `registry`, and tells the hold timer, the journal writer and `owners`.

    Invariants: after any change that may have ended the last use of an image, the hold timer
    was told (`wake_for` or `wake`), so no timer runs out late; after any that may have ended
    an allocation's last use, `owners` forgot it (see core/owners.py). The images must be
    mounted when a use begins (`open`, `acquire`): the manager mounts them.
    """

    def __init__(
        self,
        registry: Registry,
        timer: HoldTimer,
        journal: JournalWriter,
        metrics: Metrics,
        clock: Callable[[], float],
        owners: Owners,
    ) -> None:
        self.registry = registry
        self.timer = timer
        self.journal = journal
        self.metrics = metrics
        self.clock = clock
        self.owners = owners
        self._wake_for = timer.wake_for  # bound once: close() calls it on every release
        self._handed: list[tuple[str, Use]] = []  # trees handed out in their grace time

    def open(self, name: str, alloc: str) -> Use:
        """Count a handle of *alloc*. The image must be mounted (just after ensure_mounted)."""
        return self.registry[name].open(alloc, self.clock())

    def transfer(self, name: str, use: Use, alloc: str) -> Use | None:
        """Count one open of *use* for *alloc* instead (see Image.transfer)."""
        new = self.registry[name].transfer(use, alloc, self.clock())
        if new is not None:
            log.debug("%s: an executable of %s counts for %s now that it runs", name,
                      use.alloc, alloc)
            self._left(use.alloc)
        return new

    def close(self, name: str, use: Use) -> None:
        """A handle counted in *use* was released."""
        image = self.registry[name]
        try:
            image.close(use, self.clock())
        except RefcountInconsistency:
            self.metrics.inc("uenvfs_refcount_errors_total")
            log.exception("refcount bug on %s; continuing", name)
        self._wake_for(image)
        if use.alloc not in image.users:
            self._left(use.alloc)

    def _left(self, alloc: str) -> None:
        """*alloc* left an image: forget its owner if that was its last use."""
        if alloc in self.owners and not self.registry.users_of(alloc):
            self.owners.forget(alloc)

    def sitting(self, found: Mapping[str, Mapping[str, int]]) -> bool:
        """A scan found these processes sitting in images: count them (see fuse/uses.py).
        Returns whether any sits in a mounted image."""
        changed = self.registry.sitting(found, self.clock())
        for image in changed:
            log.debug("%s: processes sitting there: %s", image.name,
                      {u.alloc: u.cwd for u in image.users.values() if u.cwd} or "none")
        if changed:
            self.timer.wake()
            self.owners.prune()
        return any(u.cwd for i in self.registry if i.is_mounted for u in i.users.values())

    def tree_handed(self, name: str, alloc: str) -> None:
        """A tree of *name* was handed to a process of *alloc* (the query socket's `tree`):
        a use of *alloc* at once, for TREE_GRACE seconds, so that the image cannot expire
        before the caller has bound it. The image must be mounted (just after
        ensure_mounted), as for `open`.

        A stand-in until mount namespaces that hold an image count as its uses (issue 28):
        counted as an open handle, closed after the grace time or when the daemon stops.
        """
        handout = (name, self.open(name, alloc))
        self._handed.append(handout)

        async def grace() -> None:
            await trio.sleep(TREE_GRACE)
            if handout in self._handed:
                self._handed.remove(handout)
                self.close(*handout)

        trio.lowlevel.spawn_system_task(grace, name=f"tree-grace:{name}")

    def end_handouts(self) -> None:
        """The daemon stops: the trees handed out count no longer (see tree_handed)."""
        for handout in self._handed:
            self.close(*handout)
        self._handed.clear()

    async def acquire(self, name: str, alloc: str, uid: int | None = None) -> bool | None:
        """*alloc* (of *uid*, if given) uses *name* until released; in the journal once this
        returns. False if it had acquired it already; None if *name* is not mounted now (mount
        it first)."""
        image = self.registry[name]
        if not image.is_mounted:
            return None
        new = image.acquire(alloc, self.clock())
        if uid is not None:
            self.owners.learn(alloc, uid, "acquire")
        await self.journal.durable()
        return new

    async def release(self, alloc: str, names: Iterable[str] | None = None) -> list[str]:
        """*alloc* no longer uses *names* (default: any image); in the journal once this
        returns. Returns the images it left."""
        left = self.registry.release(alloc, self.clock(), names)
        if left:
            self.timer.wake()
            self._left(alloc)
            await self.journal.durable()
        return left

    async def reconcile(self, live: Iterable[str]) -> list[tuple[str, str]]:
        """Only the *live* allocations exist: release every other one; in the journal once
        this returns. Returns (image, allocation) of each use released."""
        dropped = self.registry.reconcile(live, self.clock())
        self.timer.wake()
        self.owners.prune()
        await self.journal.durable()
        return dropped

    def users(self, name: str) -> Collection[str]:
        """The allocations that use *name* now."""
        return self.registry[name].users.keys()

    def allocations(self) -> set[str]:
        """Every allocation that uses an image now."""
        return self.registry.allocations()
