"""The uses of every image, counted in the state machine: the handles the filesystem opens,
the acquisitions made by command, the trees handed out by the query socket, and what a scan of
the processes finds (processes sitting in images, mount namespaces holding them).

A use that ends may start an image's hold timer, so the timer is told whenever one ends.
Acquisitions and releases are in the journal before they are answered; handles are not
(they die with the connection; a resumed connection has them in the ledger).

The owners of allocations (core/owners.py) are kept for the allocations in use: an
acquisition may name one, and an allocation whose last use ends is forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping

from ..core.errors import RefcountInconsistency
from ..core.metrics import Metrics
from ..core.owners import Owners
from ..core.registry import Registry
from ..core.state import Image, Scanned, Use
from .hold_timer import HoldTimer
from .journal_writer import JournalWriter

log = logging.getLogger(__name__)


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

    def scanned(self, found: Mapping[str, Mapping[str, Scanned]]) -> None:
        """A scan of the processes found these uses of images: count them (see
        fuse/uses.py)."""
        self._changed(self.registry.scanned(found, self.clock()))

    def disconnected(self) -> None:
        """The FUSE connection is gone: no process sits in an image any more; namespaces
        holding images still do (`Registry.disconnected`)."""
        self._changed(self.registry.disconnected(self.clock()))

    def _changed(self, changed: list[Image]) -> None:
        """The counts of *changed* found by scanning changed: a use may have ended or begun."""
        for image in changed:
            log.debug("%s: processes sitting there, namespaces holding it: %s", image.name,
                      {u.alloc: (u.cwd, u.namespaces) for u in image.users.values()
                       if u.cwd or u.namespaces} or "none")
        if changed:
            self.timer.wake()
            self.owners.prune()

    def scanned_uses(self) -> bool:
        """Whether a mounted image has a use that only a scan can end: processes sitting in
        it, or namespaces holding it (a tree handed out, too)."""
        return any(u.cwd or u.namespaces for i in self.registry if i.is_mounted
                   for u in i.users.values())

    def tree_handed(self, name: str, alloc: str) -> None:
        """A tree of *name* was handed to a process of *alloc* (the query socket's `tree`):
        one namespace use at once, which scans keep for `state.GRACE` seconds at least (the
        caller attaches it meanwhile). The image must be mounted (just after
        ensure_mounted), as for `open`."""
        self.registry[name].handed(alloc, self.clock())
        log.debug("%s: a tree handed out to %s", name, alloc)

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
