"""The share of backing descriptors each allocation and each uid may hold."""

from __future__ import annotations

import errno

import pyfuse3
import pytest

from uenvfs.fuse.descriptors import MIN_PER_ALLOCATION, RESERVE, DescriptorBudget

UID = 1000


def code(budget: DescriptorBudget, alloc: str, uid: int = UID) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        budget.take(alloc, uid)
    return info.value.errno


def test_an_allocation_over_its_share_gets_emfile_and_others_go_on() -> None:
    budget = DescriptorBudget(limit=10_000, per_allocation=3)
    for _ in range(3):
        budget.take("greedy", UID)
    assert code(budget, "greedy") == errno.EMFILE
    budget.take("other", UID)  # another allocation is not held back
    assert (budget.held, budget.total, budget.refused) == ({"greedy": 3, "other": 1}, 4, 1)
    budget.give_back("greedy", UID)
    budget.take("greedy", UID)  # room again once one is closed
    for _ in range(3):
        budget.give_back("greedy", UID)
    budget.give_back("other", UID)
    assert (budget.held, budget.total) == ({}, 0)


def test_all_allocations_together_leave_the_reserve_free() -> None:
    budget = DescriptorBudget(limit=RESERVE + 4, per_allocation=100)
    for alloc in "abcd":
        budget.take(alloc, UID)
    assert code(budget, "e") == errno.ENFILE
    assert budget.total == 4


def test_the_default_share_is_half_the_limit() -> None:
    assert DescriptorBudget(RESERVE + 8000).per_allocation == 4000
    assert DescriptorBudget(300).per_allocation == MIN_PER_ALLOCATION


def test_one_uid_with_many_allocations_cannot_take_more_than_its_share() -> None:
    budget = DescriptorBudget(limit=RESERVE + 12, per_allocation=100, per_uid=4)
    for alloc in ("made-up-1", "made-up-2", "made-up-3", "made-up-3"):
        budget.take(alloc, 65534)
    assert code(budget, "made-up-4", 65534) == errno.EMFILE  # whatever the allocation
    assert code(budget, "made-up-1", 65534) == errno.EMFILE
    for _ in range(4):
        budget.take("job", 1000)  # another user
    for _ in range(4):
        budget.take("prolog", 0)  # root: the total only
    assert code(budget, "prolog", 0) == errno.ENFILE
    assert budget.by_uid == {65534: 4, 1000: 4, 0: 4}
    budget.give_back("made-up-3", 65534)
    budget.take("prolog", 0)  # the room one user gave back is everybody's
    assert code(budget, "made-up-3", 65534) == errno.ENFILE
    assert (budget.total, budget.refused) == (12, 4)


def test_the_default_share_of_a_uid_is_half_the_limit() -> None:
    assert DescriptorBudget(RESERVE + 8000).per_uid == 4000
