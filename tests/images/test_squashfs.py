"""SquashFS images read without mounting them: the superblock, `uenvfs check` and the image
check behind it (the daemon's too), and reading one file. Real images built with gensquashfs;
no FUSE, no root."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from uenvfs.client import exits
from uenvfs.image import squashfs

from ..support import build_image
from .cli_support import one_line_error, run

pytestmark = pytest.mark.skipif(
    shutil.which("gensquashfs") is None or shutil.which("rdsquashfs") is None,
    reason="needs gensquashfs and rdsquashfs (squashfs-tools-ng)",
)


# -- uenvfs check --------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """An image of 203 inodes (root, 2 directories, 200 files) with compressed metadata."""
    files = {f"dir{i % 2}/file{i:03d}": f"content {i}\n" * 10 for i in range(200)}
    return build_image(tmp_path / "good.sqfs", files)


def damaged(good: Path, name: str, change: Any) -> Path:
    data = bytearray(good.read_bytes())
    path = good.with_name(name)
    path.write_bytes(change(data))
    return path


def check(capsys: pytest.CaptureFixture[str], image: Path) -> tuple[int, str, str]:
    return run(capsys, "check", str(image))


def test_check_good(capsys: pytest.CaptureFixture[str], good: Path) -> None:
    code, out, err = check(capsys, good)
    assert (code, err) == (exits.OK, "")
    assert out.startswith(f"{good}: ok (203 inodes, ")
    assert trio.run(squashfs.check_image, good, 60) is None


def test_check_accepts_an_image_cut_after_its_used_bytes(capsys: pytest.CaptureFixture[str],
                                                         good: Path) -> None:
    used = squashfs.read_superblock(good).bytes_used
    assert used < good.stat().st_size  # gensquashfs pads to a multiple of 4 KiB
    exact = damaged(good, "exact.sqfs", lambda data: data[:used])
    assert check(capsys, exact)[0] == exits.OK


def _corrupt_inode_table(data: bytearray) -> bytearray:
    (inode_table,) = struct.unpack_from("<Q", data, 64)
    (header,) = struct.unpack_from("<H", data, inode_table)
    assert not header & 0x8000, "the first inode metadata block should be compressed"
    middle = inode_table + 2 + (header & 0x7FFF) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0x5A
    return data


@pytest.mark.parametrize(("name", "change", "reason"), [
    ("truncated", lambda data: data[: len(data) // 2], "truncated: the file has"),
    ("random", lambda data: os.urandom(len(data)), "not a SquashFS image (wrong magic number"),
    ("magic", lambda data: b"\0\1\2\3" + data[4:], "wrong magic number 00010203"),
    ("empty", lambda data: b"", "too short for a SquashFS superblock (0 bytes)"),
    ("metadata", _corrupt_inode_table, "corrupt"),
])
def test_check_bad(capsys: pytest.CaptureFixture[str], good: Path, name: str, change: Any,
                   reason: str) -> None:
    bad = damaged(good, f"{name}.sqfs", change)
    code, out, err = check(capsys, bad)
    assert (code, out) == (exits.FAILED, "")
    assert one_line_error(err).startswith(f"uenvfs check: {bad}: ")
    assert reason in err
    assert trio.run(squashfs.check_image, bad, 60) is not None


def test_check_tool_alone_detects_damage(good: Path) -> None:
    """rdsquashfs alone (the command and check_result, without the superblock pre-check)
    catches every kind of damage too."""
    for name, change in [("t", lambda d: d[: len(d) // 2]), ("m", lambda d: b"XXXX" + d[4:]),
                         ("e", lambda d: b""), ("c", _corrupt_inode_table)]:
        bad = damaged(good, f"{name}.sqfs", change)
        result = subprocess.run(squashfs.check_command(bad), capture_output=True, text=True,
                                check=False, timeout=60)
        assert squashfs.check_result(result.returncode, result.stdout, result.stderr), name
    result = subprocess.run(squashfs.check_command(good), capture_output=True, text=True,
                            check=False, timeout=60)
    assert squashfs.check_result(result.returncode, result.stdout, result.stderr) is None


def test_check_tool_hangs_or_is_missing(capsys: pytest.CaptureFixture[str], good: Path,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same reasons as the daemon's: the tool is killed when the time is over."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "rdsquashfs").write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 60\n")
    (tools / "rdsquashfs").chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))
    code, _, err = run(capsys, "check", str(good), "--timeout", "0.5")
    assert code == exits.FAILED
    assert one_line_error(err) == (f"uenvfs check: {good}: "
                                   "rdsquashfs killed after 0.5 s without finishing")
    (tools / "rdsquashfs").unlink()
    code, _, err = run(capsys, "check", str(good))
    assert code == exits.FAILED
    assert one_line_error(err) == (f"uenvfs check: {good}: cannot run rdsquashfs: No such file "
                                   "or directory (squashfs-tools-ng is needed)")


def test_check_missing_and_unknown(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = check(capsys, tmp_path / "nope.sqfs")
    assert code == exits.FAILED
    assert one_line_error(err) == f"uenvfs check: {tmp_path / 'nope.sqfs'}: no such image file"


def test_check_command_and_result() -> None:
    assert squashfs.check_command(Path("/images/a.sqfs")) == ["rdsquashfs", "-d", "/images/a.sqfs"]
    assert squashfs.check_command(Path("-odd.sqfs")) == ["rdsquashfs", "-d", "./-odd.sqfs"]
    assert squashfs.check_result(0, "dir x 0755 0 0\n", "") is None
    assert squashfs.check_result(
        1, "", "/i/a: b.sqfs: reading super block: wrong magic value in super block.\n"
    ) == "not a SquashFS image (wrong magic number)"
    assert squashfs.check_result(
        1, "", "x.sqfs: loading ID table: location out of bounds.\n"
    ) == "truncated or corrupt: loading ID table: location out of bounds"
    assert squashfs.check_result(
        1, "", "x.sqfs: reading filesystem tree: internal compressor error.\n"
    ) == "corrupt metadata: reading filesystem tree: internal compressor error"
    assert squashfs.check_result(1, "", "/x.sqfs: Permission denied\n") == "Permission denied"
    assert squashfs.check_result(1, "", "") == "no reason given"
    assert squashfs.check_result(-9, "", "") == "rdsquashfs killed by signal 9"


def test_superblock_problem(good: Path) -> None:
    header = good.read_bytes()[: squashfs.SUPERBLOCK_SIZE]
    assert squashfs.superblock_problem(header, good.stat().st_size) is None
    assert "truncated" in str(squashfs.superblock_problem(header, 100))
    superblock = squashfs.parse_superblock(header)
    assert (superblock.inodes, superblock.compressor, superblock.version) == (203, "gzip", (4, 0))
    old = header[:28] + struct.pack("<HH", 3, 1) + header[32:]
    assert "unsupported SquashFS version 3.1" in str(squashfs.superblock_problem(old, 1 << 20))


# -- reading one file ----------------------------------------------------------------------


async def test_read_file(good: Path) -> None:
    data = await squashfs.read_file(good, "dir1/file001")
    assert data == b"content 1\n" * 10
    with pytest.raises(squashfs.NotInImage):
        await squashfs.read_file(good, "meta/env.json")
    with pytest.raises(squashfs.ImageError, match="not a regular file"):
        await squashfs.read_file(good, "dir0")
    garbage = good.with_name("garbage.sqfs")
    garbage.write_bytes(os.urandom(64 * 1024))
    with pytest.raises(squashfs.ImageError, match="not a SquashFS image"):
        await squashfs.read_file(garbage, "meta/env.json")
