"""The values the mount manager and the FUSE side share: image versions, the inode prefixes
that number their files, and live backing mounts.

Inode numbers::

    1                        the root
    2, 3, 4                  .control, .status, .metrics
    prefix << 44             the directory of an image name (its prefix is fixed per name)
    prefix << 44 | ino       a file inside an image: `prefix` is that of the image version it
                             was found in, `ino` its inode number in the backing mount

so an image that is unmounted and mounted again keeps its inode numbers and the kernel's cached
dentries stay valid, while a replaced image file is a new version with a new prefix: the old
numbers answer ESTALE, which makes the kernel look the path up again. The manager makes
versions (manager/mounting.py), the filesystem numbers inodes with them (fuse/inodes.py).

Pure: no trio, no pyfuse3.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX_SHIFT = 44

Identity = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns of an image file


class InodePrefixes:
    """Hands out inode prefixes, each once in the daemon's life: one per image name (for its
    directory) and one per image version. The manager and the filesystem share one."""

    def __init__(self) -> None:
        self._next = 1

    def new(self) -> int:
        prefix = self._next
        self._next += 1
        return prefix

    def continue_after(self, last: int) -> None:
        """Hand out numbers after *last* (the last one a server before this one gave)."""
        self._next = max(self._next, last + 1)


@dataclass(eq=False)
class ImageVersion:
    """One version of one image file: the inode numbers of everything in it share `prefix`.

    When the file behind a name changes (new identity), the next mount gets a new version, so
    no inode number of the old content is ever reused for the new one.
    """

    prefix: int
    identity: Identity
    validated: bool = False  # checked once per version: a remount of the same file is not


@dataclass(eq=False)
class Mount:
    """A live backing mount of one version of an image."""

    name: str
    image_path: Path
    backing: Path
    version: ImageVersion
    source: str
    mounted_at: float = field(default_factory=time.time)
    guarded: bool = False  # its storage may hang: see fuse/workers.py
    device: int = 0  # st_dev of the files of the backing mount (its superblock); 0: unknown

    def __post_init__(self) -> None:
        self.root = os.fsencode(self.backing)  # the backing directory, for path building
