"""The mount table: /proc/<pid>/mountinfo, parsed in one place (proc_pid_mountinfo(5)).

A line is

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2) (3)  (4)   (5)      (6)     (7)    (8) (9)    (10)        (11)

mount id, parent id, device, root of the mount in its filesystem, mount point, mount options,
optional fields (none or more), a "-", filesystem type, source, superblock options. Fields are
separated by one space; the kernel writes a space, tab, newline or backslash inside one as an
octal escape (`\\040`), and any other byte as it is: a path need not be UTF-8.

Reading the table never touches a mount: the daemon may look up its own mountpoint here.
Blocking (a file read): for worker threads, start-up and the CLI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

SELF = "/proc/self/mountinfo"

_ESCAPE = re.compile(rb"\\([0-3][0-7]{2})")


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of a mountinfo file: the fields uenvfs uses.

    Paths and names are `os.fsdecode`d from the bytes the kernel wrote (unescaped): bytes
    that are not UTF-8 become surrogates, and `os.fsencode` gives the exact bytes back, so a
    path here works with `os` and `Path` as the path itself does.
    """

    mount_id: int
    parent_id: int
    device: int  # st_dev of the files of the mount (os.makedev(major, minor))
    root: str  # the directory of its filesystem mounted here: "/" unless a bind mount
    mount_point: str
    fstype: str  # with its subtype: "fuse.uenvfs"
    source: str  # "/dev/loop0", or what the filesystem names itself

    @property
    def major_minor(self) -> str:
        """The device as sysfs names it ("0:52"): /sys/class/bdi/<this>."""
        return f"{os.major(self.device)}:{os.minor(self.device)}"


def unescape(field: bytes) -> bytes:
    """A field of the table as it is: the octal escapes (`\\040`) back to their bytes."""
    if b"\\" not in field:
        return field
    return _ESCAPE.sub(lambda m: bytes((int(m[1], 8),)), field)


def _text(field: bytes) -> str:
    return os.fsdecode(unescape(field))


def parse_line(line: bytes) -> MountEntry | None:
    """One line of the table; None if it is not one (too few fields, no separator)."""
    fields = line.split(b" ")
    try:
        dash = fields.index(b"-", 6)
        major, minor = fields[2].split(b":")
        return MountEntry(int(fields[0]), int(fields[1]), os.makedev(int(major), int(minor)),
                          _text(fields[3]), _text(fields[4]), _text(fields[dash + 1]),
                          _text(fields[dash + 2]))
    except (ValueError, IndexError):
        return None


def parse(table: bytes) -> list[MountEntry]:
    """The entries of a mountinfo file's content, in its order (a mount after the one it
    covers); lines that are not entries are left out."""
    return [entry for line in table.split(b"\n")
            if line and (entry := parse_line(line)) is not None]


def read(path: str | Path = SELF) -> list[MountEntry]:
    """The entries of the mountinfo file *path* (this process's by default). Raises OSError."""
    with open(path, "rb") as table:
        return parse(table.read())


def mounts_of(devices: Collection[int], path: str | bytes | Path = SELF) -> list[MountEntry]:
    """The entries of the mountinfo file *path* whose device is one of *devices*: only their
    lines are parsed (a scan reads the table of every mount namespace). Raises OSError."""
    wanted = {b"%d:%d" % (os.major(dev), os.minor(dev)) for dev in devices}
    with open(path, "rb") as table:
        text = table.read()
    found = []
    for line in text.split(b"\n"):
        fields = line.split(b" ", 3)
        if len(fields) > 3 and fields[2] in wanted and (entry := parse_line(line)) is not None:
            found.append(entry)
    return found


def mount_at(target: str | Path, entries: Iterable[MountEntry] | None = None
             ) -> MountEntry | None:
    """The topmost mount at *target* (of *entries*, or of this process's table), or None.
    Reading this process's table raises OSError."""
    wanted = str(target)
    found = None
    for entry in read() if entries is None else entries:
        if entry.mount_point == wanted:
            found = entry
    return found


def device_at(target: str | Path, path: str | Path = SELF) -> int | None:
    """The device of the topmost mount at *target*, from the mountinfo file *path*; None if
    nothing is mounted there or the table cannot be read."""
    try:
        entry = mount_at(target, read(path))
    except OSError:
        return None
    return None if entry is None else entry.device


def type_of_device(dev: int, entries: Iterable[MountEntry]) -> str | None:
    """The filesystem type of the device *dev* (an st_dev) among *entries*; None if no mount
    of it is there."""
    return next((entry.fstype for entry in entries if entry.device == dev), None)
