"""core/numbers.py: allocation numbers held while slots use them, handed out again after."""

from __future__ import annotations

from uenvfs.core.numbers import AllocationNumbers


def test_a_number_is_held_while_used_and_handed_out_again_lowest_first() -> None:
    named: list[int] = []
    numbers = AllocationNumbers()

    def record(number: int) -> bool:  # always room
        named.append(number)
        return True

    assert [numbers.take(a, record) for a in ("a", "b", "a", "c")] == [1, 2, 1, 3]
    assert named == [1, 2, 3]  # a record for each new number only
    numbers.drop(2)
    numbers.drop(1)
    assert numbers.by_name == {"a": 1, "c": 3}  # a: one slot still uses it
    numbers.drop(1)
    assert numbers.by_name == {"c": 3}
    assert numbers.take("d", record) == 1
    assert numbers.take("e", record) == 2
    assert numbers.take("f", record) == 4
    numbers.drop(0)  # no allocation: nothing
    assert numbers.by_name == {"c": 3, "d": 1, "e": 2, "f": 4}


def test_no_room_for_the_record_gives_no_number_and_keeps_it_for_later() -> None:
    numbers = AllocationNumbers({1: 1, 3: 2}, {1: "a"})  # 3 in use without a name
    assert numbers.by_name == {"a": 1}
    assert numbers.take("b", lambda number: False) == 0
    assert numbers.take("b", lambda number: True) == 2  # the spare number, not lost
    assert numbers.take("c", lambda number: True) == 4  # 3 is still in use
    for _ in range(2):
        numbers.drop(3)
    assert numbers.take("d", lambda number: True) == 3
