"""The journal's format and atomic writes, and the start-up recovery plan (pure)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uenvfs.core.settings import SettingsRecord
from uenvfs.kernel import mountinfo
from uenvfs.manager import journal
from uenvfs.manager.journal import Journal, JournalError, MountRecord
from uenvfs.manager.recovery import loop_backing_file, plan

RECORD = MountRecord("/images/a.sqfs", "/state/mnt/a", (1, 2, 3, 4), ("slurm-7",), 1.5,
                     {"slurm-7": 1000})


def test_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    assert journal.load(path) is None
    data = Journal({"a": RECORD, "b": MountRecord("/images/b.sqfs", "/state/mnt/b")})
    journal.save(path, data)
    assert journal.load(path) == data
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["journal.json"]  # no temp file left


def test_settings_roundtrip_and_an_older_journal_has_none(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    data = Journal({"a": RECORD}, SettingsRecord(hold_time=5.0, hold_time_configured=60.0,
                                                 hold_times={"a": 600.0, "b": 0.0},
                                                 emergency=True))
    journal.save(path, data)
    assert journal.load(path) == data
    older = b'{"version": 1, "mounts": {}}'  # written before the settings were journaled
    assert journal.parse(older) == Journal()
    settings = journal.parse(older).settings
    assert (settings.hold_time, settings.emergency) == (None, False)


def test_an_older_journal_has_no_owners() -> None:
    older = (b'{"version": 1, "mounts": {"a": {"image_path": "/a", "backing": "/b", '
             b'"acquired": ["slurm-7"]}}}')  # written before owners were journaled
    record = journal.parse(older).mounts["a"]
    assert (record.acquired, record.owners) == (("slurm-7",), {})


@pytest.mark.parametrize(
    "data",
    [b'{"version": 1, "mounts": {}, "hold_time": -1}',
     b'{"version": 1, "mounts": {}, "hold_time": true}',
     b'{"version": 1, "mounts": {}, "hold_times": {"../x": 5}}',
     b'{"version": 1, "mounts": {}, "hold_times": {"a": "5"}}',
     b'{"version": 1, "mounts": {}, "hold_times": []}',
     b'{"version": 1, "mounts": {}, "emergency": 1}'],
)
def test_bad_settings_are_a_journal_error(data: bytes) -> None:
    with pytest.raises(JournalError):
        journal.parse(data)


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"\xff\xfe", b"[]", b'{"version": 2, "mounts": {}}', b'{"version": 1}',
     b'{"version": 1, "mounts": {"../x": {"image_path": "/a", "backing": "/b"}}}',
     b'{"version": 1, "mounts": {"a": {"image_path": 1, "backing": "/b"}}}',
     b'{"version": 1, "mounts": {"a": {"image_path": "/a", "backing": "/b", "identity": [1]}}}',
     b'{"version": 1, "mounts": {"a": {"image_path": "/a", "backing": "/b", '
     b'"acquired": ["bad id"]}}}',
     *(b'{"version": 1, "mounts": {"a": {"image_path": "/a", "backing": "/b", '
       b'"acquired": ["j"], "owners": %s}}}' % owners
       for owners in (b'[]', b'{"j": -1}', b'{"j": 4294967295}', b'{"j": "5"}', b'{"j": true}',
                      b'{"other": 5}')),
     os.urandom(300)],
)
def test_garbage_is_a_journal_error(data: bytes) -> None:
    with pytest.raises(JournalError):
        journal.parse(data)


def test_truncated_journal_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    journal.save(path, Journal({"a": RECORD}))
    whole = path.read_bytes()
    for cut in range(1, len(whole) - 2, 7):
        with pytest.raises(JournalError):
            journal.parse(whole[:cut])


MOUNTINFO = b"""\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
40 22 7:0 / /state/mnt/a ro,nosuid,nodev - squashfs /dev/loop0 ro
41 22 7:1 / /state/mnt/new ro,nosuid,nodev - squashfs /dev/loop1 ro
42 22 0:50 / /state/mnt/fused rw,nosuid - fuse.squashfuse_ll squashfuse_ll ro
43 22 7:2 / /state/mnt/twice ro - squashfs /dev/loop2 ro
44 43 7:3 / /state/mnt/twice ro - squashfs /dev/loop3 ro
45 22 7:4 / /state/mnt/a/deeper ro - squashfs /dev/loop4 ro
46 22 7:5 / /state/mnt/.hidden ro - squashfs /dev/loop5 ro
47 22 0:51 / /elsewhere/mnt/x ro - squashfs /dev/loop6 ro
"""


def test_recovery_plan() -> None:
    entries = mountinfo.parse(MOUNTINFO)
    old = Journal({"a": RECORD, "gone": MountRecord("/images/gone.sqfs", "/state/mnt/gone",
                                                    acquired=("alloc-1",))})
    loops = {"/dev/loop1": "/images/new.sqfs"}
    result = plan(old, entries, Path("/state/mnt"), loops.get)
    adopted = {a.name: a for a in result.adopt}
    assert sorted(adopted) == ["a", "fused", "new", "twice"]
    assert adopted["a"].record == RECORD
    assert adopted["new"].record is None
    assert adopted["new"].image_path == "/images/new.sqfs"
    assert adopted["fused"].image_path is None
    assert adopted["twice"].source == "/dev/loop3"  # the topmost of a double mount
    assert result.dropped == ["gone"]
    assert sorted(e.mount_point for e in result.detach) == [
        "/state/mnt/.hidden", "/state/mnt/a/deeper", "/state/mnt/twice"]
    summary = result.summary()
    assert "adopted 4 backing mounts (a)" in summary
    assert "1 acquisitions restored" in summary
    assert "1 stale journal entries dropped (gone)" in summary


def test_recovery_without_journal_adopts_from_the_mount_table() -> None:
    result = plan(None, mountinfo.parse(MOUNTINFO), Path("/state/mnt"))
    assert [a.name for a in result.adopt] == ["a", "fused", "new", "twice"]
    assert all(a.record is None for a in result.adopt)
    assert result.dropped == []


def test_loop_backing_file(tmp_path: Path) -> None:
    (tmp_path / "loop3/loop").mkdir(parents=True)
    (tmp_path / "loop3/loop/backing_file").write_text("/images/x.sqfs\n")
    (tmp_path / "loop4/loop").mkdir(parents=True)
    (tmp_path / "loop4/loop/backing_file").write_text("/images/y.sqfs (deleted)\n")
    assert loop_backing_file("/dev/loop3", tmp_path) == "/images/x.sqfs"
    assert loop_backing_file("/dev/loop4", tmp_path) is None
    assert loop_backing_file("/dev/loop9", tmp_path) is None
    assert loop_backing_file("squashfuse_ll", tmp_path) is None
