"""core/numbers.py: allocation numbers held while slots use them, kept named for a while
after, then handed out again."""

from __future__ import annotations

from uenvfs.core.numbers import IDLE, AllocationNumbers


class Log:
    """The ALLOC records written, with room for them or not."""

    def __init__(self, room: bool = True) -> None:
        self.room = room
        self.records: list[tuple[int, str]] = []

    def __call__(self, number: int, name: str) -> bool:
        if self.room:
            self.records.append((number, name))
        return self.room


def test_a_number_is_held_while_used_and_kept_named_for_a_while_after() -> None:
    log = Log()
    numbers = AllocationNumbers(log)
    assert [numbers.take(a) for a in ("a", "b", "a", "c")] == [1, 2, 1, 3]
    assert log.records == [(1, "a"), (2, "b"), (3, "c")]  # a record for each new number only
    numbers.drop(2)
    numbers.drop(1)
    assert numbers.live() == {"a": 1, "c": 3}  # a: one slot still uses it; b: idle
    assert len(numbers.live()) == 2
    numbers.drop(1)
    assert numbers.live() == {"c": 3}
    for _ in range(3):  # a job opening and closing one file at a time: no record each time
        assert numbers.take("a") == 1
        numbers.drop(1)
    assert numbers.take("b") == 2
    assert len(log.records) == 3
    numbers.drop(0)  # no allocation: nothing
    numbers.drop(7)  # not in use: nothing
    assert numbers.live() == {"b": 2, "c": 3}


def test_unused_numbers_are_forgotten_once_as_many_as_used_and_at_a_compaction() -> None:
    log = Log()
    numbers = AllocationNumbers(log)
    for index in range(IDLE):  # made-up names, each opened and closed once
        numbers.drop(numbers.take(f"made-up-{index}"))
    assert len(numbers.by_name) == IDLE  # kept named: up to IDLE unused
    assert numbers.live() == {}
    numbers.drop(numbers.take("one-more"))
    assert numbers.by_name == {}  # all forgotten
    assert numbers.take("new") in range(1, IDLE + 2)  # handed out again, in a new record
    assert log.records[-1][1] == "new"
    assert len(log.records) == IDLE + 2
    # With many allocations in use, as many may be unused before they are forgotten.
    used = [numbers.take(f"live-{index}") for index in range(2 * IDLE)]
    for index in range(2 * IDLE):
        numbers.drop(numbers.take(f"gone-{index}"))
    numbers.drop(numbers.take("as many unused as used"))
    assert len(numbers.by_name) == 4 * IDLE + 2  # new, live, gone: all named still
    numbers.drop(numbers.take("one more"))
    assert set(numbers.by_name) == {"new"} | {f"live-{index}" for index in range(2 * IDLE)}
    assert numbers.live() == numbers.by_name
    numbers.drop(used[0])
    numbers.forget_idle()  # a compaction
    assert "live-0" not in numbers.by_name
    assert len(numbers.live()) == 2 * IDLE


def test_no_room_for_the_record_gives_no_number_and_keeps_it_for_later() -> None:
    log = Log(room=False)
    numbers = AllocationNumbers(log, {1: 1, 3: 2}, {1: "a"})  # 3 in use without a name
    assert numbers.by_name == {"a": 1}
    assert numbers.take("b") == 0
    log.room = True
    assert numbers.take("b") == 2  # the spare number, not lost
    assert numbers.take("c") == 4  # 3 is still in use
    for _ in range(2):
        numbers.drop(3)
    numbers.forget_idle()
    assert numbers.take("d") == 3
