"""Backing descriptors of open files, shared out between allocations.

Every file open in an image holds one descriptor of the daemon. Without a bound, one job (any
user can open files) could take them all: every other job would then get EMFILE on its reads
and EIO on its first access, and a prolog's `acquire` would fail. So each allocation may hold
at most `per_allocation` of them (beyond that its opens fail with EMFILE, "Too many open
files", as its own process limit would say), and all allocations together leave `RESERVE`
descriptors free for the daemon's own work: mounting, the journal, `.control`.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3

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
    """Descriptors held for open files, by allocation.

    Invariants: `held[a]` is the number of descriptors taken and not given back by allocation
    `a`, at most `per_allocation`; `total == sum(held.values()) <= limit - RESERVE`.
    """

    def __init__(self, limit: int, per_allocation: int = 0) -> None:
        self.limit = limit
        self.per_allocation = per_allocation or default_per_allocation(limit)
        self.held: dict[str, int] = {}
        self.total = 0
        self.refused = 0

    def take(self, alloc: str) -> None:
        """One more descriptor for *alloc*; raises FUSEError (EMFILE, ENFILE) if over."""
        held = self.held.get(alloc, 0)
        if held >= self.per_allocation:
            self._refuse(alloc, errno.EMFILE, "its share")
        if self.total >= self.limit - RESERVE:
            self._refuse(alloc, errno.ENFILE, "the daemon's limit")
        self.held[alloc] = held + 1
        self.total += 1

    def give_back(self, alloc: str) -> None:
        held = self.held[alloc] - 1
        if held:
            self.held[alloc] = held
        else:
            del self.held[alloc]
        self.total -= 1

    def _refuse(self, alloc: str, code: int, what: str) -> None:
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th, 8th... time
            log.warning("%s holds %d open files in images: over %s (%d); open refused "
                        "(%d refusals so far)", alloc, self.held.get(alloc, 0), what,
                        self.per_allocation if code == errno.EMFILE else self.limit - RESERVE,
                        self.refused)
        raise pyfuse3.FUSEError(code)
