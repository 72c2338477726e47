"""The listing cache: listings replayed per image version, the least recently used dropped."""

from __future__ import annotations

import os
from pathlib import Path

import pyfuse3

from uenvfs.inodes import PREFIX_SHIFT
from uenvfs.listings import Listing, ListingCache, scan


def listing(entries: int) -> Listing:
    """A listing of *entries* entries (`.` and `..` included)."""
    attrs = pyfuse3.EntryAttributes()
    return Listing([(b"%d" % i, attrs) for i in range(entries)])


def test_the_least_recently_used_listings_go_when_the_entries_are_over_the_limit() -> None:
    cache = ListingCache(limit=10)
    a, b, c = listing(4), listing(4), listing(2)
    cache.add((1, b"a"), a)
    cache.add((1, b"b"), b)
    cache.add((2, b""), c)
    assert (list(cache), cache.entries) == ([(1, b"a"), (1, b"b"), (2, b"")], 10)
    assert cache.recall((1, b"a")) is a  # used: now the most recent
    assert cache.get((1, b"b")) is b  # a plain look-up (lookup's): no reordering
    cache.add((3, b"d"), listing(3))
    assert (list(cache), cache.entries) == ([(2, b""), (1, b"a"), (3, b"d")], 9)
    assert cache.recall((1, b"b")) is None


def test_a_listing_bigger_than_the_limit_is_kept_alone() -> None:
    cache = ListingCache(limit=10)
    cache.add((1, b"small"), listing(3))
    big = cache.add((1, b"big"), listing(25))
    assert (list(cache), cache.entries) == ([(1, b"big")], 25)
    cache.add((1, b"next"), listing(3))
    assert (list(cache), cache.entries) == ([(1, b"next")], 3)
    assert big.find(b"24") is not None


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
