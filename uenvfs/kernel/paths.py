"""System calls on backing paths of any length.

The kernel refuses a path of PATH_MAX (4,096) bytes or more, but an image may be deeper than
that: FUSE sends one name at a time, so the kernel mount of the same image reaches every file.
A backing path that long is resolved in pieces, each below the limit, relative to directory
descriptors; the call then sees the same file through `/proc/self/fd/N/rest`. Shorter paths
(nearly all) are passed straight through: one length test is all they cost.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

ROOM = 3800  # longest path passed as it is (room left for /proc/self/fd/N/)

T = TypeVar("T")


@contextmanager
def reachable(path: bytes) -> Iterator[bytes]:
    """*path*, or an equivalent shorter one valid inside the `with` block.

    Every component but the last must be a directory (true of backing paths, which are built
    from lookups in directories): the pieces are opened with O_NOFOLLOW.
    """
    if len(path) < ROOM:
        yield path
        return
    parts = path.split(b"/")
    fd = os.open(b"/" if path.startswith(b"/") else b".", os.O_PATH | os.O_CLOEXEC)
    try:
        piece: list[bytes] = []
        size = 0
        for part in parts[:-1]:
            if not part:
                continue
            if size + len(part) + 1 > ROOM:
                fd = _descend(fd, b"/".join(piece))
                piece, size = [], 0
            piece.append(part)
            size += len(part) + 1
        piece.append(parts[-1])
        yield b"/proc/self/fd/%d/%s" % (fd, b"/".join(piece))
    finally:
        os.close(fd)


def _descend(fd: int, relative: bytes) -> int:
    """The directory *relative* to *fd*, opened O_PATH; *fd* is closed."""
    try:
        return os.open(relative, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=fd)
    finally:
        os.close(fd)


def call(fn: Callable[[bytes], T], path: bytes) -> T:
    """`fn(path)` for a *path* of any length."""
    if len(path) < ROOM:
        return fn(path)
    with reachable(path) as short:
        return fn(short)


def lstat(path: bytes) -> os.stat_result:
    return os.lstat(path) if len(path) < ROOM else call(os.lstat, path)


def open_file(path: bytes, flags: int) -> int:
    if len(path) < ROOM:
        return os.open(path, flags)
    with reachable(path) as short:
        return os.open(short, flags)
