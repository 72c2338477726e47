"""What the handles of each uid may keep: handles without a descriptor, allocations, snapshot
bytes; root is held to the totals only."""

from __future__ import annotations

import errno

import pyfuse3
import pytest

from uenvfs.fuse import shares
from uenvfs.fuse.shares import HandleShares

NOBODY = 65534


def code(book: HandleShares, uid: int, alloc: str = "", **kwargs: object) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        book.take(uid, alloc, **kwargs)  # type: ignore[arg-type]
    return info.value.errno


def test_a_uid_past_its_share_gets_emfile_root_and_the_others_go_on() -> None:
    book = HandleShares(per_uid=3, total=8)
    for _ in range(3):
        book.take(NOBODY)
    assert code(book, NOBODY) == errno.EMFILE
    book.take(1000)
    for _ in range(4):
        book.take(0)  # root: past a uid's share
    assert code(book, 0) == errno.ENFILE  # never past the total
    assert (book.held, book.held_total, book.refused) == ({NOBODY: 3, 1000: 1, 0: 4}, 8, 2)
    book.give_back(NOBODY)
    book.take(NOBODY)  # room again once one is released
    for _ in range(3):
        book.give_back(NOBODY)
    assert NOBODY not in book.held


def test_file_handles_count_for_the_allocations_only() -> None:
    book = HandleShares(per_uid=1, total=1, allocations_per_uid=2)
    for _ in range(5):
        book.take(NOBODY, "job-1", held=False)  # a file: its descriptor is its bound
    book.take(NOBODY, "job-2", held=False)
    assert code(book, NOBODY, "made-up", held=False) == errno.EMFILE  # a third allocation
    book.take(0, "prolog-1", held=False)
    book.take(0, "prolog-2", held=False)
    book.take(0, "prolog-3", held=False)  # root: as many allocations as it likes
    for _ in range(5):
        book.give_back(NOBODY, "job-1", held=False)
    book.take(NOBODY, "made-up", held=False)  # job-1 has no handle left
    assert book.allocations[NOBODY] == {"job-2": 1, "made-up": 1}
    assert book.held_total == 0


def test_a_snapshot_counts_once_per_uid_however_many_handles_keep_it() -> None:
    book = HandleShares(per_uid=1000, total=1000)
    big = b"x" * (shares.SNAPSHOT_BYTES_PER_UID // 2)
    for _ in range(100):
        book.take(NOBODY, pinned=big, size=len(big))
    assert book.pinned == {NOBODY: len(big)}
    other = b"y" * (shares.SNAPSHOT_BYTES_PER_UID // 2 + 1)  # two would be over the share
    assert code(book, NOBODY, pinned=other, size=len(other)) == errno.EMFILE
    book.take(1000, pinned=other, size=len(other))  # another uid's share
    book.take(0, pinned=big, size=len(big))  # counted for each uid that keeps it
    assert book.pinned_total == 2 * len(big) + len(other)
    for _ in range(100):
        book.give_back(NOBODY, pinned=big)
    book.take(NOBODY, pinned=other, size=len(other))
    assert book.pinned[NOBODY] == len(other)


def test_the_daemon_keeps_snapshot_bytes_to_its_total(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shares, "SNAPSHOT_BYTES", 100)
    book = HandleShares()
    book.take(0, pinned=b"a" * 60, size=60)
    assert code(book, 0, pinned=b"b" * 60, size=60) == errno.ENFILE


def test_restored_handles_are_counted_and_never_refused() -> None:
    book = HandleShares(per_uid=1, total=1, allocations_per_uid=1)
    for alloc in ("a", "b", "c"):
        book.take(NOBODY, alloc, restored=True)
    assert (book.held[NOBODY], len(book.allocations[NOBODY])) == (3, 3)
    assert code(book, NOBODY) == errno.EMFILE
