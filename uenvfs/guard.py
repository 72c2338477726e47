"""Keeping an image whose storage is slow or hung from holding up every other image.

The daemon answers every request in one event loop. A system call on a backing mount that has
to read the image file waits for that file's storage; if the storage hangs (a hung Lustre or
NFS server), the loop would hang with it, and with it every image, `.status` and `.control`.

So the backing mounts of images on *guarded* storage take every system call that may have to
read the image file to a worker thread of the image (`Workers`: a few threads per image; an
image whose storage hangs holds its own threads, never the loop). What the kernel can answer
from memory is still answered in the loop, as for any image: a read whose pages are all in the
page cache (`cachestat(2)`), a lookup or an open whose path is all in the dentry cache
(`openat2(2)` with `RESOLVE_CACHED`). Kernels without those calls send every such call to the
thread.

Which storage is guarded (configuration `storage_guard`): `auto` guards images on any
filesystem but the local disk filesystems in `LOCAL_FILESYSTEMS` (network and cluster
filesystems, FUSE); `always` guards every image; `never` none. Not guarding local disks is a
measured trade: a worker thread hop costs 150-400 us on this 2-core machine, which would make
cold reads of small files from a local disk markedly slower, and a local disk that hangs takes
the node's own state directory with it anyway.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import trio

log = logging.getLogger(__name__)

LOCAL_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "bcachefs", "jfs", "reiserfs",
    "tmpfs", "ramfs", "overlay",
})
THREADS_PER_IMAGE = 4  # worker threads of one guarded image at most

SYS_OPENAT2 = 437
SYS_CACHESTAT = 451
RESOLVE_CACHED = 0x20
AT_FDCWD = -100
PAGE = os.sysconf("SC_PAGESIZE")

T = TypeVar("T")

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


def filesystem_type(dev: int) -> str | None:
    """The type of the mounted filesystem whose device number is *dev* (as in st_dev), from
    this process's mount table; None if none is found."""
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError as exc:
        log.warning("cannot read the mount table: %s", exc)
    return None


class Storage:
    """Which images' storage is guarded, by the device number of their image file."""

    def __init__(self, mode: str = "auto") -> None:
        self.mode = mode
        self._types: dict[int, str | None] = {}

    def guarded(self, dev: int) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        if dev not in self._types:
            self._types[dev] = filesystem_type(dev)
        kind = self._types[dev]
        return kind is None or kind not in LOCAL_FILESYSTEMS


class Workers:
    """A few worker threads per image, for the system calls that may wait for its storage."""

    def __init__(self, per_image: int = THREADS_PER_IMAGE) -> None:
        self.per_image = per_image
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self.calls = 0  # calls sent to a thread, for tests and metrics

    def limiter(self, image: str) -> trio.CapacityLimiter:
        limiter = self._limiters.get(image)
        if limiter is None:
            limiter = self._limiters[image] = trio.CapacityLimiter(self.per_image)
        return limiter

    async def run(self, image: str, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in one of *image*'s worker threads."""
        self.calls += 1
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter(image))
