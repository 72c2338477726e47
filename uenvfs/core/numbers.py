"""The numbers of the allocations that the ledger's handle slots name (core/shared_ledger.py):
a slot holds a number, and the ledger's log an ALLOC record that names it. A number is held
while a slot uses it. Once none does, it stays named for a while, so that a job opening and
closing one file at a time does not write a record at each open; when as many numbers are
unused as used (and more than `IDLE`), or the log is compacted, the unused ones are forgotten
and handed out again. So made-up allocation names cannot make the numbers (nor their records,
nor this table) grow beyond twice the slots in use, or `IDLE`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

IDLE = 64  # unused numbers kept named at least


class AllocationNumbers:
    """Allocation name <-> number, with how many slots use each number.

    *record*(number, name) writes the log's ALLOC record for a number newly handed out; it
    returns False if the log has no room for it.

    Invariants: `by_name` and `_names` are each other's inverse, but for numbers whose name
    is unknown (""); `_names` and `_uses` have the same numbers; `_unused` is the number of
    those with `_uses[number] == 0`, at most `max(IDLE, len(_uses) - _unused)`; `_spare`
    holds exactly the numbers below `_top` not in `_uses`."""

    def __init__(self, record: Callable[[int, str], bool],
                 uses: Mapping[int, int] | None = None,
                 names: Mapping[int, str] | None = None) -> None:
        """Numbers in use by the slots (*uses*: number -> slots), named by *names* (a
        number without a name is kept from reuse all the same)."""
        self._record = record
        self._uses = dict(uses or {})
        self._names = {number: (names or {}).get(number, "") for number in self._uses}
        self.by_name = {name: number for number, name in self._names.items() if name}
        self._unused = 0
        self._top = max(self._uses, default=0)
        self._spare = sorted(set(range(1, self._top)) - self._uses.keys(), reverse=True)

    def take(self, alloc: str) -> int:
        """The number of *alloc* for one more slot. A new number is named first by its
        record; if that has no room, 0 (no allocation)."""
        number = self.by_name.get(alloc)
        if number is not None:
            uses = self._uses[number]
            if not uses:
                self._unused -= 1
            self._uses[number] = uses + 1
            return number
        number = self._spare.pop() if self._spare else self._top + 1
        if not self._record(number, alloc):
            if number <= self._top:
                self._spare.append(number)
            return 0
        self._top = max(self._top, number)
        self.by_name[alloc] = number
        self._names[number] = alloc
        self._uses[number] = 1
        return number

    def drop(self, number: int) -> None:
        """One slot less uses *number* (0: no allocation)."""
        uses = self._uses.get(number)
        if not uses:
            return
        self._uses[number] = uses - 1
        if uses == 1:
            self._unused += 1
            if self._unused > IDLE and 2 * self._unused > len(self._uses):
                self.forget_idle()

    def forget_idle(self) -> None:
        """Forget every number no slot uses (the log is compacted: their records go)."""
        for number in [number for number, uses in self._uses.items() if not uses]:
            del self._uses[number]
            name = self._names.pop(number)
            if name:
                del self.by_name[name]
            self._spare.append(number)
        self._unused = 0

    def live(self) -> dict[str, int]:
        """The allocations that slots use: name -> number."""
        return {name: number for name, number in self.by_name.items() if self._uses[number]}
