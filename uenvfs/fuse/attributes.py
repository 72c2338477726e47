"""The attributes the filesystem answers: from a backing file's `stat`, or made up."""

from __future__ import annotations

import os
import stat

import pyfuse3
from pyfuse3 import InodeT, ModeT

# Images never change while mounted: the kernel may cache names and attributes for long.
KERNEL_CACHE_SECONDS = 3600.0


def from_stat(
    st: os.stat_result, ino: int, timeout: float = KERNEL_CACHE_SECONDS
) -> pyfuse3.EntryAttributes:
    """A backing file's attributes, under our inode number *ino*."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = InodeT(ino)
    attrs.generation = 0
    attrs.entry_timeout = timeout
    attrs.attr_timeout = timeout
    attrs.st_mode = ModeT(st.st_mode)
    attrs.st_nlink = st.st_nlink
    attrs.st_uid = st.st_uid
    attrs.st_gid = st.st_gid
    attrs.st_rdev = st.st_rdev
    attrs.st_size = st.st_size
    attrs.st_blksize = st.st_blksize
    attrs.st_blocks = st.st_blocks
    attrs.st_atime_ns = st.st_atime_ns
    attrs.st_mtime_ns = st.st_mtime_ns
    attrs.st_ctime_ns = st.st_ctime_ns
    return attrs


def synthetic(ino: int, mode: int, time_ns: int, timeout: float) -> pyfuse3.EntryAttributes:
    """Made-up attributes (owned by root, all three times *time_ns*)."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = InodeT(ino)
    attrs.entry_timeout = timeout
    attrs.attr_timeout = timeout
    attrs.st_mode = ModeT(mode)
    attrs.st_nlink = 2 if stat.S_ISDIR(mode) else 1
    attrs.st_uid = 0
    attrs.st_gid = 0
    attrs.st_blksize = 4096
    attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = time_ns
    return attrs


def negative_entry() -> pyfuse3.EntryAttributes:
    """A negative entry: an image never changes, so the kernel may remember that the name
    does not exist (Python's imports, PATH and library searches ask again and again)."""
    missing = pyfuse3.EntryAttributes()
    missing.st_ino = InodeT(0)
    missing.entry_timeout = KERNEL_CACHE_SECONDS
    return missing
