"""The share of backing descriptors each allocation may hold."""

from __future__ import annotations

import errno

import pyfuse3
import pytest

from uenvfs.fuse.descriptors import MIN_PER_ALLOCATION, RESERVE, DescriptorBudget


def code(budget: DescriptorBudget, alloc: str) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        budget.take(alloc)
    return info.value.errno


def test_an_allocation_over_its_share_gets_emfile_and_others_go_on() -> None:
    budget = DescriptorBudget(limit=10_000, per_allocation=3)
    for _ in range(3):
        budget.take("greedy")
    assert code(budget, "greedy") == errno.EMFILE
    budget.take("other")  # another allocation is not held back
    assert (budget.held, budget.total, budget.refused) == ({"greedy": 3, "other": 1}, 4, 1)
    budget.give_back("greedy")
    budget.take("greedy")  # room again once one is closed
    for _ in range(3):
        budget.give_back("greedy")
    budget.give_back("other")
    assert (budget.held, budget.total) == ({}, 0)


def test_all_allocations_together_leave_the_reserve_free() -> None:
    budget = DescriptorBudget(limit=RESERVE + 4, per_allocation=100)
    for alloc in "abcd":
        budget.take(alloc)
    assert code(budget, "e") == errno.ENFILE
    assert budget.total == 4


def test_the_default_share_is_half_the_limit() -> None:
    assert DescriptorBudget(RESERVE + 8000).per_allocation == 4000
    assert DescriptorBudget(300).per_allocation == MIN_PER_ALLOCATION
