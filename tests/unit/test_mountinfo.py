"""The one parser of /proc/<pid>/mountinfo: fields, escapes, bytes that are not UTF-8, and
the look-ups built on it (pure, but for reading a file)."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from uenvfs.kernel import mountinfo
from uenvfs.kernel.mountinfo import MountEntry

# As the kernel writes them: optional fields (none, one, two), a bind mount of a directory,
# a space, a tab, a newline and a backslash escaped, a name that is not UTF-8, no source.
TABLE = (
    b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    b"60 22 0:52 / /run/pact/uenv rw,nosuid,nodev,relatime shared:300 master:7 - fuse.uenvfs"
    b" uenvfs rw,user_id=0,group_id=0,default_permissions,allow_other\n"
    b"61 22 0:52 /tools /user\\040tools rw,nosuid - fuse.uenvfs uenvfs rw\n"
    b"62 22 7:3 / /state/mnt/a\\011tab\\012nl\\134bs ro,nosuid,nodev - squashfs /dev/loop3 ro\n"
    b"63 22 0:60 /caf\xe9 /data/caf\xe9 rw - tmpfs  rw\n"
    b"64 60 259:65539 / /run/pact/uenv rw - fuse.uenvfs uenvfs rw\n"
)


def test_every_field_of_real_lines() -> None:
    entries = mountinfo.parse(TABLE)
    assert entries[:3] == [
        MountEntry(22, 1, os.makedev(8, 1), "/", "/", "ext4", "/dev/sda1"),
        MountEntry(60, 22, os.makedev(0, 52), "/", "/run/pact/uenv", "fuse.uenvfs", "uenvfs"),
        MountEntry(61, 22, os.makedev(0, 52), "/tools", "/user tools", "fuse.uenvfs", "uenvfs"),
    ]
    assert entries[3].mount_point == "/state/mnt/a\ttab\nnl\\bs"
    assert entries[3].source == "/dev/loop3"
    assert entries[5].device == os.makedev(259, 65539)
    assert entries[5].major_minor == "259:65539"


def test_a_path_that_is_not_utf8_comes_back_as_its_bytes() -> None:
    entry = mountinfo.parse(TABLE)[4]
    assert os.fsencode(entry.mount_point) == b"/data/caf\xe9"
    assert os.fsencode(entry.root) == b"/caf\xe9"
    assert entry.source == ""  # an empty field: fields are split on single spaces
    assert entry.fstype == "tmpfs"


def test_lines_that_are_not_entries_are_left_out() -> None:
    assert mountinfo.parse(b"garbage\n\n1 2 3\n") == []
    assert mountinfo.parse(b"1 2 x:y / /a rw - ext4 /dev/sda rw\n") == []  # no device
    assert mountinfo.parse(b"1 2 8:1 / /a rw ext4 /dev/sda rw\n") == []  # no separator
    assert mountinfo.parse(b"1 2 8:1 / /a rw -\n") == []  # nothing after it
    assert len(mountinfo.parse(b"junk\n" + TABLE)) == 6


def test_unescape() -> None:
    assert mountinfo.unescape(b"/a\\040b") == b"/a b"
    assert mountinfo.unescape(b"/plain") == b"/plain"
    # An escaped backslash before digits: the digits stay digits.
    assert mountinfo.unescape(b"/x\\134040") == b"/x\\040"
    assert mountinfo.unescape(b"/odd\\9\\400") == b"/odd\\9\\400"  # not escapes: as they are


def kernel_escape(path: bytes) -> bytes:
    """What the kernel writes for *path* (fs/proc_namespace.c: mangle)."""
    for char in b"\\ \t\n":  # the backslash first
        path = path.replace(bytes((char,)), b"\\%03o" % char)
    return path


@given(st.binary(max_size=40).filter(lambda b: b"\0" not in b))
def test_any_path_survives_the_table(name: bytes) -> None:
    path = b"/mnt/" + name
    line = b"70 22 0:80 %s %s rw - tmpfs src rw\n" % (kernel_escape(path), kernel_escape(path))
    (entry,) = mountinfo.parse(line)
    assert os.fsencode(entry.mount_point) == path
    assert os.fsencode(entry.root) == path


def test_the_topmost_mount_at_a_path() -> None:
    entries = mountinfo.parse(TABLE)
    top = mountinfo.mount_at("/run/pact/uenv", entries)
    assert top is not None
    assert top.mount_id == 64  # the later of the two there
    assert mountinfo.mount_at(Path("/user tools"), entries) == entries[2]
    assert mountinfo.mount_at("/nowhere", entries) is None


def test_device_at_reads_the_table_and_never_fails(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(b"22 1 0:21 / /run rw - tmpfs tmpfs rw\n"
                      b"23 22 0:52 / /run/pact/a\\040b rw - fuse.uenvfs uenvfs rw\n"
                      b"24 22 0:53 / /run/pact/a\\040b rw - fuse.uenvfs uenvfs rw\n")
    assert mountinfo.device_at("/run/pact/a b", table) == os.makedev(0, 53)  # the last
    assert mountinfo.device_at("/run", str(table)) == os.makedev(0, 21)
    assert mountinfo.device_at("/nowhere", table) is None
    assert mountinfo.device_at("/", tmp_path / "missing") is None


def test_the_mounts_of_some_devices_are_read_alone(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_bytes(TABLE + b"not an entry 7:3 at all\n")
    loop3, fuse = os.makedev(7, 3), os.makedev(0, 52)
    assert mountinfo.mounts_of([loop3], table) == [mountinfo.parse(TABLE)[3]]
    assert [e.mount_id for e in mountinfo.mounts_of({fuse, loop3}, bytes(table))] == [60, 61, 62]
    assert mountinfo.mounts_of([os.makedev(9, 9)], table) == []


def test_the_type_of_a_device() -> None:
    entries = mountinfo.parse(TABLE)
    assert mountinfo.type_of_device(os.makedev(7, 3), entries) == "squashfs"
    assert mountinfo.type_of_device(os.makedev(0, 52), entries) == "fuse.uenvfs"
    assert mountinfo.type_of_device(os.makedev(9, 9), entries) is None


def test_this_process_table() -> None:
    entries = mountinfo.read()
    assert mountinfo.mount_at("/", entries) is not None
    proc = mountinfo.mount_at("/proc", entries)
    assert proc is not None
    assert proc.fstype == "proc"
