"""Backing descriptors of open files, shared out between allocations and users.

Every file open in an image holds one descriptor of the daemon. Without a bound, one job (any
user can open files) could take them all: every other job would then get EMFILE on its reads
and EIO on its first access, and a prolog's `acquire` would fail. So each allocation may hold
at most `per_allocation` of them, and each user (uid) at most `per_uid` whatever the
allocations its processes count for (beyond either, its opens fail with EMFILE, "Too many open
files", as its own process limit would say); root's processes are held to the total only. All
together leave `RESERVE` descriptors free for the daemon's own work: mounting, the journal,
`.control`.
"""

from __future__ import annotations

import errno
import logging
import resource

import pyfuse3

from ..core.ledger_layout import SLOTS

log = logging.getLogger(__name__)

RESERVE = 256  # descriptors kept for mounts, the journal, tools, sockets
MIN_PER_ALLOCATION = 64


def default_per_allocation(limit: int) -> int:
    """Half of what the daemon may open: one greedy job leaves the other half to the rest.

    (An eighth was tried first: 64 processes of one job reading 200 files each, the
    benchmark's storm, held 2,468 at once, more than an eighth of a limit of 20,000.)
    """
    return max(MIN_PER_ALLOCATION, (limit - RESERVE) // 2)


class DescriptorBudget:
    """Descriptors held for open files, by allocation and by uid.

    Invariants: `held[a]` is the number of descriptors taken and not given back by allocation
    `a`, at most `per_allocation`; `by_uid[u]` the number taken by processes of uid `u`, at
    most `per_uid` but for uid 0; `total == sum(held.values()) == sum(by_uid.values()) <=
    limit - RESERVE`.
    """

    def __init__(self, limit: int, per_allocation: int = 0, per_uid: int = 0) -> None:
        self.limit = limit
        self.per_allocation = per_allocation or default_per_allocation(limit)
        self.per_uid = per_uid or default_per_allocation(limit)
        self.held: dict[str, int] = {}
        self.by_uid: dict[int, int] = {}
        self.total = 0
        self.refused = 0

    @classmethod
    def of_server(cls, per_allocation: int, per_uid: int) -> DescriptorBudget:
        """The budget of a server, its descriptor limit raised as far as the system allows
        (every open file in every image holds one backing descriptor), but no more files
        than the ledger has slots for (a share of a higher limit could take every slot)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        limit = min(hard, SLOTS)
        budget = cls(limit, per_allocation, per_uid)
        log.info("open files: %d per allocation, %d per uid, %d in all (descriptor limit %d)",
                 budget.per_allocation, budget.per_uid, limit - RESERVE, hard)
        return budget

    def take(self, alloc: str, uid: int) -> None:
        """One more descriptor for *alloc*, opened by a process of *uid*; raises FUSEError
        (EMFILE past a share, ENFILE past the daemon's limit) if over."""
        held = self.held.get(alloc, 0)
        if held >= self.per_allocation:
            self._refuse(f"{alloc} holds {held}", errno.EMFILE, "its share", self.per_allocation)
        mine = self.by_uid.get(uid, 0)
        if uid and mine >= self.per_uid:
            self._refuse(f"uid {uid} ({alloc}) holds {mine}", errno.EMFILE, "the share of a uid",
                         self.per_uid)
        if self.total >= self.limit - RESERVE:
            self._refuse(f"{alloc} (uid {uid}) holds {held}", errno.ENFILE, "the daemon's limit",
                         self.limit - RESERVE)
        self.held[alloc] = held + 1
        self.by_uid[uid] = mine + 1
        self.total += 1

    def give_back(self, alloc: str, uid: int) -> None:
        held = self.held[alloc] - 1
        if held:
            self.held[alloc] = held
        else:
            del self.held[alloc]
        mine = self.by_uid[uid] - 1
        if mine:
            self.by_uid[uid] = mine
        else:
            del self.by_uid[uid]
        self.total -= 1

    def _refuse(self, who: str, code: int, what: str, bound: int) -> None:
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th, 8th... time
            log.warning("%s open files in images: over %s (%d); open refused (%d refusals "
                        "so far)", who, what, bound, self.refused)
        raise pyfuse3.FUSEError(code)
