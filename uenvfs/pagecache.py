"""Whether a range of a file is in the page cache: cachestat(2) (Linux 6.5), one system call.

A read whose pages are cached is served at once in the event loop; one that must wait for the
disk goes to a worker thread, so that the loop serves other requests meanwhile and several
cold reads (the kernel's readahead sends them in parallel) wait for the disk together.
"""

from __future__ import annotations

import ctypes
import errno
import struct

PAGE = 4096
SYS_CACHESTAT = 451  # the same number on every architecture (since Linux 6.5)

_libc = ctypes.CDLL(None, use_errno=True)
_range = ctypes.create_string_buffer(16)  # struct cachestat_range {u64 off, len}
_stat = ctypes.create_string_buffer(40)  # struct cachestat {u64 nr_cache, ...}
_pack_range = struct.Struct("=QQ").pack_into
_unpack_count = struct.Struct("=Q").unpack_from
_available = True


def cached(fd: int, offset: int, size: int) -> bool | None:
    """Whether every page of [offset, offset+size) of *fd* is cached; None if unknown."""
    global _available
    if not _available:
        return None
    _pack_range(_range, 0, offset, size)
    if _libc.syscall(SYS_CACHESTAT, fd, _range, _stat, 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # old kernel, or seccomp
            _available = False
        return None
    pages = (offset + size + PAGE - 1) // PAGE - offset // PAGE
    count: int = _unpack_count(_stat)[0]
    return count >= pages
