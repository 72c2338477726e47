"""The listing cache: listings replayed per image version, the least recently used dropped."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import pyfuse3

from uenvfs.core.model import PREFIX_SHIFT
from uenvfs.fuse.attributes import from_stat
from uenvfs.fuse.listings import ENTRY_BYTES, Listing, ListingCache, scan


def listing(entries: int, name: bytes = b"") -> Listing:
    """A listing of *entries* entries (`.` and `..` included), named *name* and a number."""
    attrs = pyfuse3.EntryAttributes()
    return Listing([(name + b"%d" % i, attrs) for i in range(entries)])


def test_a_listing_is_estimated_by_its_entries_and_the_length_of_its_names() -> None:
    assert listing(10).memory == 10 * ENTRY_BYTES + 10  # names 0 to 9
    assert listing(10, b"long" * 50).memory == 10 * ENTRY_BYTES + 10 * 201
    assert Listing().memory == 0


def test_the_least_recently_used_listings_go_when_the_memory_is_over_the_limit() -> None:
    cache = ListingCache(limit=10 * ENTRY_BYTES + 10)  # names of one digit
    a, b, c = listing(4), listing(4), listing(2)
    cache.add((1, b"a"), a)
    cache.add((1, b"b"), b)
    cache.add((2, b""), c)
    assert list(cache) == [(1, b"a"), (1, b"b"), (2, b"")]
    assert (cache.entries, cache.memory) == (10, cache.limit)
    assert cache.recall((1, b"a")) is a  # used: now the most recent
    assert cache.get((1, b"b")) is b  # a plain look-up (lookup's): no reordering
    cache.add((3, b"d"), listing(3))
    assert (list(cache), cache.entries) == ([(2, b""), (1, b"a"), (3, b"d")], 9)
    assert cache.memory == 9 * ENTRY_BYTES + 9
    assert cache.recall((1, b"b")) is None


def test_long_names_count_against_the_limit() -> None:
    cache = ListingCache(limit=100 * ENTRY_BYTES)
    cache.add((1, b"short"), listing(50))
    cache.add((1, b"long"), listing(50, b"x" * 255))  # as many entries, 13 KB more
    assert list(cache) == [(1, b"long")]
    assert cache.memory == cache[(1, b"long")].memory <= cache.limit


def test_a_listing_bigger_than_the_limit_is_kept_alone() -> None:
    cache = ListingCache(limit=10 * ENTRY_BYTES)
    cache.add((1, b"small"), listing(3))
    big = cache.add((1, b"big"), listing(25))
    assert (list(cache), cache.entries, cache.memory) == ([(1, b"big")], 25, big.memory)
    cache.add((1, b"next"), listing(3))
    assert (list(cache), cache.entries) == ([(1, b"next")], 3)
    assert cache.memory == cache[(1, b"next")].memory
    assert big.find(b"24") is not None


def test_the_estimate_is_near_the_memory_a_listing_takes(tmp_path: Path) -> None:
    # Made as `scan` makes them: an EntryAttributes of a real stat per entry; names of 8 to 32
    # bytes. Measured with its index: 349 bytes an entry, 0.92 times the estimate (Python 3.11).
    st = os.lstat(tmp_path)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        entries = Listing((b"entry-%d." % i + b"x" * (i % 21), from_stat(st, i))
                          for i in range(20_000))
        assert entries.find(b"entry-2.xx") is not None  # 0 and 1 stand for . and ..
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.75 < taken / entries.memory < 1.25


def test_scan_numbers_the_entries_by_image_version(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to("file")
    entries = scan(os.fsencode(tmp_path), 7, 3)
    assert [name for name, _ in entries[:2]] == [b".", b".."]
    assert sorted(name for name, _ in entries[2:]) == [b"file", b"link"]
    assert entries[0][1].st_ino == 7
    link = entries.find(b"link")
    assert link is not None
    assert link.st_ino == 3 << PREFIX_SHIFT | os.lstat(tmp_path / "link").st_ino
    assert entries.find(b"missing") is None
    assert entries.find(b".") is None  # . and .. are not names to look up
