"""The handle table and its kinds: each reads, lists and releases itself, or answers EBADF."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from uenvfs.core.state import Use
from uenvfs.fuse.descriptors import DescriptorBudget
from uenvfs.fuse.handles import DirHandle, FileHandle, Handle, HandleTable, RootDirHandle
from uenvfs.fuse.inodes import STATUS, Node
from uenvfs.fuse.listings import Listing
from uenvfs.fuse.prefetch import Prefetcher
from uenvfs.fuse.root import DataHandle


class Closes:
    """Stands in for the manager: records the uses closed."""

    def __init__(self) -> None:
        self.closed: list[tuple[str, Use]] = []

    def close(self, name: str, use: Use) -> None:
        self.closed.append((name, use))


def errno_of(call: Any, *args: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        call(*args)
    return info.value.errno


@pytest.fixture
def prefetcher() -> Iterator[Prefetcher]:
    prefetcher = Prefetcher()
    yield prefetcher
    prefetcher.close()


def open_file(path: Path, image: str, prefetcher: Prefetcher) -> FileHandle:
    budget = DescriptorBudget(1024)
    budget.take("alloc", 1000)
    return FileHandle(image, Use("alloc"), 1000, 99, os.open(path, os.O_RDONLY), prefetcher,
                      budget, "alloc")


def test_numbers_are_never_reused_and_unknown_ones_are_ebadf() -> None:
    table = HandleTable()
    first = table.add(RootDirHandle(Listing(), 1000))
    assert table.release(first) is not None
    assert table.release(first) is None
    second = table.add(DataHandle(STATUS, b"x", 1000))
    assert (first, second) == (1, 2)
    assert errno_of(table.__getitem__, first) == errno.EBADF
    assert table.get(first) is None


async def test_each_kind_does_what_it_can(tmp_path: Path, prefetcher: Prefetcher) -> None:
    (tmp_path / "f").write_bytes(b"content")
    node = Node(5, "img", 2, b"dir")
    entries = Listing([(b".", pyfuse3.EntryAttributes())])
    file = open_file(tmp_path / "f", "img", prefetcher)
    directory = DirHandle("img", Use("alloc"), 1000, node, entries)
    root = RootDirHandle(entries, 1000)
    data = DataHandle(STATUS, b"status", 1000)
    assert file.read(2, 3) == b"nte"
    assert data.read(2, 100) == b"atus"
    assert directory.listing() == (entries, node)
    assert root.listing() == (entries, None)
    kinds: list[Handle] = [file, directory, root, data]
    assert [errno_of(h.read, 0, 1) for h in kinds[1:3]] == [errno.EBADF] * 2
    assert [errno_of(h.listing) for h in (file, data)] == [errno.EBADF] * 2
    for handle in kinds:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await handle.write(b"x")
        assert info.value.errno == errno.EBADF
    closes: Any = Closes()
    for handle in kinds:
        handle.release(closes)
    assert closes.closed == [("img", file.use), ("img", directory.use)]
    assert file.dead
    assert errno_of(file.read, 0, 1) == errno.EIO


def test_force_unmount_kills_the_handles_of_one_image(
    tmp_path: Path, prefetcher: Prefetcher
) -> None:
    (tmp_path / "f").write_bytes(b"content")
    table = HandleTable()
    node = Node(5, "img", 2, b"dir")
    file = open_file(tmp_path / "f", "img", prefetcher)
    other = open_file(tmp_path / "f", "other", prefetcher)
    directory = DirHandle("img", Use("alloc"), 1000, node, Listing())
    for handle in (file, other, directory, RootDirHandle(Listing(), 1000),
                   DataHandle(STATUS, b"", 1000)):
        table.add(handle)
    assert table.counted() == 3
    assert table.kill("img") == (2, [99])
    assert errno_of(file.read, 0, 1) == errno.EIO
    assert errno_of(directory.listing) == errno.EIO
    assert other.read(0, 4) == b"cont"
    assert table.kill("img") == (1, [])  # the file was closed already; the directory counts
    closes: Any = Closes()
    file.release(closes)  # a killed handle is still released once (its fd is not closed again)
    other.release(closes)
    assert closes.closed == [("img", file.use), ("other", other.use)]
