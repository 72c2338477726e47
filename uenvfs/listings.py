"""Directory listings of image versions, read once and replayed (images never change)."""

from __future__ import annotations

import os
from collections import OrderedDict

import pyfuse3

from . import paths
from .attributes import from_stat
from .inodes import child_ino

CACHE_ENTRIES = 200_000  # directory entries kept for replay (about 200 bytes each)


class Listing(list[tuple[bytes, pyfuse3.EntryAttributes]]):
    """A directory's entries in order (`.` and `..` first), with their attributes."""

    names: dict[bytes, pyfuse3.EntryAttributes] | None = None

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
        entries = Listing([(b".", here), (b"..", here)])
        with os.scandir(short) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                entries.append((os.fsencode(entry.name), from_stat(st, child_ino(prefix, st))))
    return entries


class ListingCache(OrderedDict[tuple[int, bytes], Listing]):
    """Listings by (image version prefix, path in the image), least recently used first.

    Invariants: `entries` is the number of entries of all listings kept; after `add` it is at
    most `limit`, or a single listing is kept (the one just added, however big). Add through
    `add` only; `get` is a plain look-up (no reordering), `recall` marks a listing as used.
    """

    def __init__(self, limit: int = CACHE_ENTRIES) -> None:
        super().__init__()
        self.limit = limit
        self.entries = 0

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
        while self.entries > self.limit and len(self) > 1:
            _, dropped = self.popitem(last=False)
            self.entries -= len(dropped)
        return listing
