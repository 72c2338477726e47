"""Directory listings of image versions, read once and replayed (images never change)."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable

import pyfuse3

from ..kernel import paths
from .attributes import from_stat
from .inodes import child_ino

# Memory of one entry besides its name's bytes, measured on listings of 10,000 to 300,000
# entries made by `scan` (Python 3.11, pyfuse3 3.5): 327-350 bytes by tracemalloc, 375-400 by
# RSS growth from 100,000 entries on. About 300 are the entry (its EntryAttributes 200 bytes,
# the (name, attrs) tuple 56, the name's bytes object 33, the list's slot 8), 30 to 60 the
# index `find` makes (a dict slot 24 bytes and an index 4, a third to two thirds full).
ENTRY_BYTES = 360
# Listings kept for replay, by that estimate: about 175,000 entries with 20-byte names, near the
# former bound of 200,000 entries (which took 75 MB, not the 40 MB it was thought to, and 125 MB
# with 255-byte names). All the listings of the benchmark's Python environment (12,794 files)
# take 5.5 MB (15,087 entries).
CACHE_BYTES = 64 << 20

Entry = tuple[bytes, pyfuse3.EntryAttributes]


class Listing(list[Entry]):
    """A directory's entries in order (`.` and `..` first), with their attributes.

    `memory` is the estimated bytes of the entries it was made with (ENTRY_BYTES each plus
    the names). A listing is not changed once made (only the root's, which is not cached, is
    added to while it is made).
    """

    names: dict[bytes, pyfuse3.EntryAttributes] | None = None

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        super().__init__(entries)
        self.memory = len(self) * ENTRY_BYTES + sum(len(name) for name, _ in self)

    def find(self, name: bytes) -> pyfuse3.EntryAttributes | None:
        """The attributes of the entry *name*, if the directory has it (an index is made on
        the first call)."""
        if self.names is None:
            self.names = dict(self[2:])
        return self.names.get(name)


def scan(path: bytes, ino: int, prefix: int) -> Listing:
    """The listing of the backing directory *path*, our inode *ino* of image version *prefix*."""
    with paths.reachable(path) as short:
        here = from_stat(os.lstat(short), ino)
        entries = [(b".", here), (b"..", here)]
        with os.scandir(short) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                entries.append((os.fsencode(entry.name), from_stat(st, child_ino(prefix, st))))
    return Listing(entries)  # its memory is counted here, in the scanning thread


class ListingCache(OrderedDict[tuple[int, bytes], Listing]):
    """Listings by (image version prefix, path in the image), least recently used first.

    Invariants: `entries` is the number of entries of all listings kept, `memory` the sum of
    their estimated memory (`Listing.memory`); after `add`, `memory` is at most `limit`, or a
    single listing is kept (the one just added, however big). Add through `add` only; `get` is
    a plain look-up (no reordering), `recall` marks a listing as used.
    """

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        super().__init__()
        self.limit = limit
        self.entries = 0
        self.memory = 0

    def recall(self, key: tuple[int, bytes]) -> Listing | None:
        """The listing of *key*, now the most recently used; None if not kept."""
        listing = self.get(key)
        if listing is not None:
            self.move_to_end(key)
        return listing

    def add(self, key: tuple[int, bytes], listing: Listing) -> Listing:
        """Keep *listing* for *key* (not kept yet), dropping the least recently used listings
        over the limit."""
        self[key] = listing
        self.entries += len(listing)
        self.memory += listing.memory
        while self.memory > self.limit and len(self) > 1:
            _, dropped = self.popitem(last=False)
            self.entries -= len(dropped)
            self.memory -= dropped.memory
        return listing
