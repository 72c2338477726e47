"""The numbers of the allocations that the ledger's handle slots name (core/shared_ledger.py):
a slot holds a number, and the ledger's log an ALLOC record that names it. A number is held
while a slot uses it; once none does, it is forgotten and handed out again, lowest first, so
made-up allocation names cannot make the numbers (nor their records) grow."""

from __future__ import annotations

from collections.abc import Callable, Mapping


class AllocationNumbers:
    """Allocation name <-> number, with how many slots use each number.

    Invariants: `by_name` and `_names` are each other's inverse, but for numbers whose name
    is unknown (""); every number in `_names` has `_uses[number] > 0`; `_spare` holds exactly
    the numbers below `_top` that no slot uses."""

    def __init__(self, uses: Mapping[int, int] | None = None,
                 names: Mapping[int, str] | None = None) -> None:
        """Numbers in use by the slots (*uses*: number -> slots), named by *names* (a
        number without a name is kept from reuse all the same)."""
        self._uses = dict(uses or {})
        self._names = {number: (names or {}).get(number, "") for number in self._uses}
        self.by_name = {name: number for number, name in self._names.items() if name}
        self._top = max(self._uses, default=0)
        self._spare = sorted(set(range(1, self._top)) - self._uses.keys(), reverse=True)

    def take(self, alloc: str, record: Callable[[int], bool]) -> int:
        """The number of *alloc* for one more slot. A new number is named first by
        *record*(number) (the log's ALLOC record); if that has no room, 0 (no allocation)."""
        number = self.by_name.get(alloc)
        if number is not None:
            self._uses[number] += 1
            return number
        number = self._spare.pop() if self._spare else self._top + 1
        if not record(number):
            if number <= self._top:
                self._spare.append(number)
            return 0
        self._top = max(self._top, number)
        self.by_name[alloc] = number
        self._names[number] = alloc
        self._uses[number] = 1
        return number

    def drop(self, number: int) -> None:
        """One slot less uses *number* (0: no allocation): forgotten with the last."""
        uses = self._uses.get(number)
        if uses is None:
            return
        if uses > 1:
            self._uses[number] = uses - 1
            return
        del self._uses[number]
        name = self._names.pop(number)
        if name:
            del self.by_name[name]
        self._spare.append(number)
