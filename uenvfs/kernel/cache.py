"""What the kernel's caches can answer without reading a file's storage: an open or lstat
whose path is all in the dentry cache (`openat2(2)` with `RESOLVE_CACHED`, Linux 5.12), a
read whose pages are all in the page cache (`cachestat(2)`, Linux 6.5). A kernel without
those calls answers "not cached" and the caller goes to a worker thread (fuse/workers.py).

Only the standard library; these calls are made in the event loop's thread only (they reuse
one buffer each).
"""

from __future__ import annotations

import ctypes
import errno
import os

SYS_OPENAT2 = 437
SYS_CACHESTAT = 451
RESOLVE_CACHED = 0x20
AT_FDCWD = -100
PAGE = os.sysconf("SC_PAGESIZE")


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64), ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


# One of each, reused: these calls are made in the loop thread only.
_how = _OpenHow(0, 0, RESOLVE_CACHED)
_how_ref = ctypes.byref(_how)
_how_size = ctypes.c_size_t(ctypes.sizeof(_OpenHow))
_range = _Range()
_range_ref = ctypes.byref(_range)
_stat = _Cachestat()
_stat_ref = ctypes.byref(_stat)
_missing: set[int] = set()  # the calls this kernel does not have (ENOSYS)


def open_cached(path: bytes, flags: int) -> int | None:
    """`open(path, flags)` if every component of *path* is in the dentry cache (no disk read
    needed to find it), else None. Raises OSError as open does (FileNotFoundError also for a
    name the cache knows is not there)."""
    if SYS_OPENAT2 in _missing:
        return None
    _how.flags = flags
    fd: int = _syscall(SYS_OPENAT2, AT_FDCWD, path, _how_ref, _how_size)
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code == errno.EAGAIN:
        return None
    if code in (errno.ENOSYS, errno.E2BIG):
        _missing.add(SYS_OPENAT2)
        return None
    raise OSError(code, os.strerror(code), path)


def lstat_cached(path: bytes) -> os.stat_result | None:
    """`lstat(path)` if the dentry cache can answer it (see `open_cached`), else None."""
    fd = open_cached(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if fd is None:
        return None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def is_cached(fd: int, offset: int, length: int) -> bool:
    """Whether every page of *fd*'s file from *offset* for *length* bytes is in the page
    cache. An empty range is."""
    if length <= 0:
        return True
    if SYS_CACHESTAT in _missing:
        return False
    first = offset // PAGE
    last = (offset + length - 1) // PAGE
    _range.off = first * PAGE
    _range.len = (last - first + 1) * PAGE
    if _syscall(SYS_CACHESTAT, fd, _range_ref, _stat_ref, 0) != 0:
        if ctypes.get_errno() == errno.ENOSYS:
            _missing.add(SYS_CACHESTAT)
        return False
    return bool(_stat.nr_cache >= last - first + 1)
