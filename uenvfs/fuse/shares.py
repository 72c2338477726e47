"""What the open handles of each user keep in the daemon, shared out between users.

A file handle holds a descriptor, which fuse/descriptors.py shares out. Every other handle
holds none, but memory: an open directory (of an image, or the mount root), `.status`,
`.metrics` and `.control`. Uncounted, one user holding such handles could grow the daemon
until it was killed (and every server after it, restoring the same handles). So, by the uid
of the process that opened them:

  - handles without a descriptor: at most `per_uid` for each uid, `total` in all;
  - the allocations that a uid's handles (of every kind) count for: at most
    `allocations_per_uid` (the ledger keeps a record for each allocation in use, see
    core/shared_ledger.py: a user cannot fill it with made-up names);
  - the snapshots its handles keep (a root listing, a `.status` or `.metrics` content, see
    fuse/snapshots.py): each counted once per uid, however many of its handles share it, at
    most `SNAPSHOT_BYTES_PER_UID` for each uid, `SNAPSHOT_BYTES` in all.

Past a uid's share its opens fail with EMFILE ("Too many open files"), past the daemon's total
with ENFILE; a warning names the uid (the 1st, 2nd, 4th, 8th... time). Root's processes
(slurmstepd, the prolog, the operator) are held to the totals only.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3

from ..core.config import Config

log = logging.getLogger(__name__)

SNAPSHOT_BYTES_PER_UID = 64 << 20  # bytes of snapshots a uid's handles keep
SNAPSHOT_BYTES = 256 << 20  # in all


class HandleShares:
    """The handles of each uid, and what they keep.

    Invariants: `held[u]` is the number of handles without a descriptor that uid `u` holds,
    `held_total` their sum; `allocations[u][a]` the number of handles of uid `u` (of every
    kind) counting for allocation `a` (> 0: an allocation without handles is dropped);
    `pins[u, id(s)]` the number of handles of uid `u` keeping snapshot `s`, with its size,
    `pinned[u]` the sum of those sizes for `u`, `pinned_total` over every uid. Nothing is
    taken past a share unless restored (a server restoring the last one's handles counts
    them all).
    """

    def __init__(self, per_uid: int = Config.handles_per_uid,
                 total: int = Config.handles_total,
                 allocations_per_uid: int = Config.allocations_per_uid) -> None:
        self.per_uid = per_uid
        self.total = total
        self.allocations_per_uid = allocations_per_uid
        self.held: dict[int, int] = {}
        self.held_total = 0
        self.allocations: dict[int, dict[str, int]] = {}
        self.pins: dict[tuple[int, int], list[int]] = {}  # (uid, id) -> [handles, size]
        self.pinned: dict[int, int] = {}
        self.pinned_total = 0
        self.refused = 0

    def take(self, uid: int, alloc: str = "", *, held: bool = True, pinned: object = None,
             size: int = 0, restored: bool = False) -> None:
        """One more handle of *uid*, counting for *alloc* ("" for none); *held*: it holds no
        descriptor (counted here); *pinned*: the snapshot it keeps, of *size* bytes. Raises
        FUSEError (EMFILE past the uid's share, ENFILE past the total) unless *restored*."""
        allocs = self.allocations.get(uid)
        new_alloc = bool(alloc) and (allocs is None or alloc not in allocs)
        pin = None if pinned is None else self.pins.get((uid, id(pinned)))
        if not restored:
            self._check(uid, alloc, held, new_alloc, size if pinned is not None and pin is None
                        else 0)
        if held:
            self.held[uid] = self.held.get(uid, 0) + 1
            self.held_total += 1
        if alloc:
            if allocs is None:
                allocs = self.allocations[uid] = {}
            allocs[alloc] = allocs.get(alloc, 0) + 1
        if pin is not None:
            pin[0] += 1
        elif pinned is not None:
            self.pins[uid, id(pinned)] = [1, size]
            self.pinned[uid] = self.pinned.get(uid, 0) + size
            self.pinned_total += size

    def take_file(self, uid: int, alloc: str) -> None:
        """`take` for a file handle (it holds a descriptor: fuse/descriptors.py counts it),
        quick when *uid* has handles counting for *alloc* already (every open of a job's)."""
        allocs = self.allocations.get(uid)
        if allocs is not None and alloc in allocs:
            allocs[alloc] += 1
        else:
            self.take(uid, alloc, held=False)

    def give_back_file(self, uid: int, alloc: str) -> None:
        """`give_back` for a file handle (taken by `take_file`)."""
        if alloc:
            allocs = self.allocations[uid]
            count = allocs[alloc] - 1
            if count:
                allocs[alloc] = count
            else:
                del allocs[alloc]
                if not allocs:
                    del self.allocations[uid]

    def give_back(self, uid: int, alloc: str = "", *, held: bool = True,
                  pinned: object = None) -> None:
        """A handle taken with these arguments is gone."""
        if held:
            count = self.held[uid] - 1
            if count:
                self.held[uid] = count
            else:
                del self.held[uid]
            self.held_total -= 1
        self.give_back_file(uid, alloc)
        if pinned is not None:
            key = (uid, id(pinned))
            pin = self.pins[key]
            pin[0] -= 1
            if not pin[0]:
                del self.pins[key]
                left = self.pinned[uid] - pin[1]
                if left:
                    self.pinned[uid] = left
                else:
                    del self.pinned[uid]
                self.pinned_total -= pin[1]

    def _check(self, uid: int, alloc: str, held: bool, new_alloc: bool, size: int) -> None:
        if uid:  # root's processes: the totals only
            if held and self.held.get(uid, 0) >= self.per_uid:
                self._refuse(uid, alloc, errno.EMFILE, f"its share of handles ({self.per_uid})")
            if new_alloc and len(self.allocations.get(uid, ())) >= self.allocations_per_uid:
                self._refuse(uid, alloc, errno.EMFILE,
                             f"its share of allocations ({self.allocations_per_uid})")
            if size and self.pinned.get(uid, 0) + size > SNAPSHOT_BYTES_PER_UID:
                self._refuse(uid, alloc, errno.EMFILE, "its share of snapshot bytes "
                             f"({SNAPSHOT_BYTES_PER_UID})")
        if held and self.held_total >= self.total:
            self._refuse(uid, alloc, errno.ENFILE, f"the daemon's handles ({self.total})")
        if size and self.pinned_total + size > SNAPSHOT_BYTES:
            self._refuse(uid, alloc, errno.ENFILE,
                         f"the daemon's snapshot bytes ({SNAPSHOT_BYTES})")

    def _refuse(self, uid: int, alloc: str, code: int, what: str) -> None:
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th, 8th... time
            log.warning("uid %d%s holds %d handles (%d allocations, %d snapshot bytes) "
                        "without a descriptor: over %s; open refused (%d refusals so far)",
                        uid, f" (allocation {alloc})" if alloc else "", self.held.get(uid, 0),
                        len(self.allocations.get(uid, ())), self.pinned.get(uid, 0), what,
                        self.refused)
        raise pyfuse3.FUSEError(code)
