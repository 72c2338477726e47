"""Which images' storage is guarded: those whose image file lies on storage that may hang.

Configuration `storage_guard`: `auto` guards images on any filesystem but the local disk
filesystems in `LOCAL_FILESYSTEMS` (network and cluster filesystems, FUSE); `always` guards
every image; `never` none. Not guarding local disks is a measured trade: a worker thread hop
costs 150-400 us on a 2-core machine, which would make cold reads of small files from a local
disk markedly slower, and a local disk that hangs takes the node's own state directory with it
anyway. What guarding does: fuse/workers.py.
"""

from __future__ import annotations

import logging

from ..kernel import mountinfo

log = logging.getLogger(__name__)

LOCAL_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "bcachefs", "jfs", "reiserfs",
    "tmpfs", "ramfs", "overlay",
})


def filesystem_type(dev: int) -> str | None:
    """The type of the mounted filesystem whose device number is *dev* (as in st_dev), from
    this process's mount table; None if none is found."""
    try:
        entries = mountinfo.read()
    except OSError as exc:
        log.warning("cannot read the mount table: %s", exc)
        return None
    return mountinfo.type_of_device(dev, entries)


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
