"""What the kernel's caches can answer without reading a file's storage: an open or lstat
whose path is all in the dentry cache (`openat2(2)` with `RESOLVE_CACHED`, Linux 5.12), a
read whose pages are all in the page cache (`cachestat(2)`, Linux 6.5). A kernel without
those calls (or an architecture whose numbers for them uenvfs does not know, see libc.py)
answers "not cached", and the caller goes to a worker thread (fuse/workers.py).

Only the standard library; these calls are made in the event loop's thread only (they reuse
one buffer each).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

from . import libc

RESOLVE_CACHED = 0x20
PAGE = os.sysconf("SC_PAGESIZE")

log = logging.getLogger(__name__)


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
_how_size = ctypes.sizeof(_OpenHow)
_range = _Range()
_range_ref = ctypes.byref(_range)
_stat = _Cachestat()
_stat_ref = ctypes.byref(_stat)
_missing: set[str] = set()  # the calls this kernel (or uenvfs on this architecture) lacks


def _without(call: str, exc: OSError) -> None:
    """Stop making *call*: this kernel does not have it, or uenvfs does not know its number
    on this architecture. Said once: the call is not made again."""
    _missing.add(call)
    log.info("%s: %s; what it would answer from the kernel's caches goes to worker threads",
             call, exc.strerror)


def open_cached(path: bytes, flags: int) -> int | None:
    """`open(path, flags)` if every component of *path* is in the dentry cache (no disk read
    needed to find it), else None. Raises OSError as open does (FileNotFoundError also for a
    name the cache knows is not there)."""
    if "openat2" in _missing:
        return None
    _how.flags = flags
    try:
        return libc.openat2(libc.AT_FDCWD, path, _how_ref, _how_size)
    except OSError as exc:
        # EINVAL: openat2 before Linux 5.12 does not know RESOLVE_CACHED (the worker thread's
        # open answers, with its own error if the flags were the reason).
        if exc.errno in (errno.EAGAIN, errno.EINVAL):
            return None
        if exc.errno in (errno.ENOSYS, errno.E2BIG):
            _without("openat2", exc)
            return None
        raise


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
    if "cachestat" in _missing:
        return False
    first = offset // PAGE
    last = (offset + length - 1) // PAGE
    _range.off = first * PAGE
    _range.len = (last - first + 1) * PAGE
    try:
        libc.cachestat(fd, _range_ref, _stat_ref)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            _without("cachestat", exc)
        return False
    return bool(_stat.nr_cache >= last - first + 1)
