"""Reading ahead of sequential readers of big files: the window logic and the thread (a big file
read through the real mount is in tests/mount/test_prefetch.py)."""

from __future__ import annotations

import ctypes
import os
import random
import struct
from pathlib import Path

import pytest

from uenvfs.fuse import prefetch
from uenvfs.fuse.prefetch import START_AFTER, WINDOW, Prefetcher, Readahead
from uenvfs.kernel import libc

MIB = 1 << 20


def test_no_window_before_a_sequential_run() -> None:
    ra = Readahead()
    assert ra.after_read(0, MIB) is None
    assert ra.after_read(5 * MIB, MIB) is None  # a jump starts the run again
    assert START_AFTER == 2 * MIB
    assert ra.after_read(6 * MIB, MIB) == (7 * MIB, WINDOW)  # 2 MiB in sequence
    assert ra.after_read(7 * MIB, MIB) is None  # well inside the window


def test_the_next_window_is_asked_for_when_half_of_the_last_is_read() -> None:
    ra = Readahead()
    offset = 0
    windows = []
    while offset < 4 * WINDOW:
        window = ra.after_read(offset, MIB)
        offset += MIB
        if window is not None:
            windows.append(window)
    starts = [start for start, _ in windows]
    # Contiguous windows, no byte asked for twice, always ahead of the reader.
    assert all(a + n == b for (a, n), b in zip(windows, starts[1:], strict=False))
    assert len(windows) >= 6
    assert windows[0][0] == START_AFTER


def test_a_short_read_at_the_end_and_a_reread_start_over() -> None:
    ra = Readahead()
    for offset in range(0, 4 * MIB, MIB):
        ra.after_read(offset, MIB)
    assert ra.ahead_until > 0
    assert ra.after_read(0, MIB) is None  # read from the start again: a new run
    assert ra.ahead_until == 0


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """Pages of the range in the page cache: cachestat(2), Linux 6.5; None if unknown."""
    rng = struct.pack("=QQ", offset, length)
    out = ctypes.create_string_buffer(40)
    try:
        libc.cachestat(fd, rng, out)
    except OSError:
        return None
    return int(struct.unpack_from("=Q", out)[0])


@pytest.fixture
def cold_file(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "big"
    size = 24 * MIB
    path.write_bytes(random.Random(1).randbytes(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cached_pages(fd, 0, size) != 0:
            pytest.skip("cannot evict a file from the page cache here (tmpfs?) or no cachestat")
    finally:
        os.close(fd)
    return path, size


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_thread_reads_the_window_into_the_page_cache(cold_file: tuple[Path, int]) -> None:
    path, _ = cold_file
    fd = os.open(path, os.O_RDONLY)
    before = open_fds()
    prefetcher = Prefetcher()
    try:
        prefetcher.ahead(Readahead(), fd, 4 * MIB, 8 * MIB)
        os.close(fd)  # the handle may close at once: the thread has its own fd
        prefetcher.close()  # waits until it is done
        assert open_fds() == before - 1
        fd = os.open(path, os.O_RDONLY)
        assert cached_pages(fd, 4 * MIB, 8 * MIB) == 8 * MIB // os.sysconf("SC_PAGE_SIZE")
        assert cached_pages(fd, 0, 4 * MIB) == 0
        assert prefetcher.requests == 1
    finally:
        os.close(fd)
        prefetcher.close()


def test_a_closed_handle_stops_its_readahead(cold_file: tuple[Path, int]) -> None:
    path, size = cold_file
    fd = os.open(path, os.O_RDONLY)
    prefetcher = Prefetcher()
    try:
        owner = Readahead()
        owner.closed = True
        prefetcher.ahead(owner, fd, 0, size)
        prefetcher.close()
        assert cached_pages(fd, 0, size) == 0
    finally:
        os.close(fd)


def test_a_full_queue_drops_hints(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(prefetch, "MAX_PENDING", 0)
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    before = open_fds()
    prefetcher = Prefetcher()
    try:
        prefetcher.ahead(Readahead(), fd, 0, MIB)
        assert prefetcher.dropped == 1
        assert prefetcher.requests == 0
        assert open_fds() == before  # nothing duplicated, no thread started
    finally:
        prefetcher.close()
        os.close(fd)
