"""Which uid each allocation belongs to, as far as the daemon knows.

A process writes its own environment: for any uid but 0, the allocation it names there counts
only if the daemon knows that allocation is that uid's (fuse/allocation.py). It learns that
from the two sources it trusts: a process of the uid in the allocation's cgroup at a configured
layout (core/cgroups.py), and `acquire NAME ALLOC UID` (root's: the Slurm prolog's, with
SLURM_JOB_UID). The latest word wins, so a resource manager that gives an id to another user's
job is believed at once. Root's processes teach nothing: root's environment needs no owner.

Pure: no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable

log = logging.getLogger(__name__)

SLACK = 64  # entries an owner map may hold before its first prune
MAX_UID = 2**32 - 2  # (uid_t)-1 is no uid


class Owners:
    """allocation id -> uid, for the allocations in use.

    Invariant: bounded by the allocations in use (*in_use*: those with a use of an image,
    acquisitions included). The manager's counts `forget` an allocation when its last use
    ends, and `prune` when uses end by command or scan; learning prunes too whenever the map
    has doubled since the last prune, so it never holds more than max(SLACK, twice the
    allocations in use) + 1, sightings of allocations that never use an image included.
    """

    def __init__(self, in_use: Callable[[], Collection[str]]) -> None:
        self._in_use = in_use
        self._uids: dict[str, int] = {}
        self._prune_at = SLACK

    def __len__(self) -> int:
        return len(self._uids)

    def __contains__(self, alloc: object) -> bool:
        return alloc in self._uids

    def owner(self, alloc: str) -> int | None:
        """The uid *alloc* belongs to, or None if not known."""
        return self._uids.get(alloc)

    def learn(self, alloc: str, uid: int, source: str) -> None:
        """*alloc* belongs to *uid* (not 0), as *source* says (for the log)."""
        old = self._uids.get(alloc)
        if old == uid:
            return
        if old is not None:
            log.info("%s belongs to uid %d now (was uid %d), as %s says", alloc, uid, old,
                     source)
        self._uids[alloc] = uid
        if len(self._uids) > self._prune_at:
            self.prune(keep=alloc)  # its first use may be on its way

    def forget(self, alloc: str) -> None:
        """*alloc* no longer uses any image."""
        self._uids.pop(alloc, None)

    def prune(self, keep: str | None = None) -> None:
        """Forget every allocation not in use now (but *keep*)."""
        live = self._in_use()
        for alloc in [a for a in self._uids if a not in live and a != keep]:
            del self._uids[alloc]
        self._prune_at = max(SLACK, 2 * len(self._uids))

    def of(self, allocs: Iterable[str]) -> dict[str, int]:
        """The known owners of *allocs*."""
        uids = self._uids
        return {a: uids[a] for a in allocs if a in uids}
