"""The tree seen through uenvfs equals the kernel's mount of the same image, byte for byte."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import DaemonFactory
from ..support import Daemon, run_in

pytestmark = pytest.mark.fuse

EUID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("euid=%d\n", (int)geteuid()); return 0; }
"""


def make_tree(src: Path) -> None:
    """Every kind of entry an image can hold, with unusual modes, times and xattrs."""
    (src / "d1/d2/d3").mkdir(parents=True)
    (src / "d1/d2/d3/deep.txt").write_text("deep\n")
    (src / "empty").write_bytes(b"")
    (src / "small.txt").write_text("hello uenv\n")
    (src / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 123))
    (src / "rel").symlink_to("small.txt")
    (src / "abs").symlink_to("/etc/hostname")
    (src / "dirlink").symlink_to("d1/d2")
    (src / "dangling").symlink_to("does/not/exist")
    (src / "hl1").write_text("one inode, two names\n")
    os.link(src / "hl1", src / "hl2")
    (src / "bin").mkdir()
    script = src / "bin/script.sh"
    script.write_text("#!/bin/sh\necho script ran\n")
    script.chmod(0o755)
    c_file = src.parent / "euid.c"
    c_file.write_text(EUID_C)
    subprocess.run(["gcc", "-O", "-o", str(src / "bin/euid"), str(c_file)], check=True)
    (src / "bin/euid").chmod(0o4755)  # setuid root stored in the image; nosuid must defeat it
    (src / "private").mkdir()
    (src / "private/secret").write_text("secret\n")
    (src / "private").chmod(0o700)
    (src / "readonly.txt").write_text("read only\n")
    (src / "readonly.txt").chmod(0o444)
    (src / "pkg").mkdir()
    (src / "pkg/__init__.py").write_text("from .mod import VALUE\n")
    (src / "pkg/mod.py").write_text("VALUE = 'imported from the image'\n")
    os.setxattr(src / "small.txt", "user.color", b"blue")
    os.setxattr(src / "big.bin", "user.checksum", b"\x00\x01binary\xff")
    os.setxattr(src / "d1", "user.dir", b"on a directory")
    for i, path in enumerate(sorted(src.rglob("*"))):
        os.utime(path, ns=(1_500_000_000_000_000_000 + i * 10**9, 1_600_000_000_000_000_000 + i),
                 follow_symlinks=False)


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Everything observable about every entry under *root*, by relative path."""
    entries: dict[str, dict[str, Any]] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames) + ([""] if dirpath == str(root) else []):
            path = Path(dirpath) / name if name else Path(dirpath)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            info: dict[str, Any] = {
                "mode": stat.filemode(st.st_mode), "size": st.st_size, "nlink": st.st_nlink,
                "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns,
                "xattrs": {n: os.getxattr(path, n, follow_symlinks=False)
                           for n in sorted(os.listxattr(path, follow_symlinks=False))},
            }
            if stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
            entries[rel] = info
    for names in inodes.values():  # hardlinks: the same groups of names share an inode
        for rel in names:
            entries[rel]["same_inode_as"] = sorted(names)
    return entries


@pytest.fixture(params=["auto", "always"])
def fidelity(make_daemon: DaemonFactory, world_tmp: Path, request: pytest.FixtureRequest
             ) -> Iterator[tuple[Daemon, Path]]:
    """A daemon serving the fidelity image, and a kernel mount of the same image; the image
    on a local disk as it is (`auto`), and as if on storage that may hang (`always`: every
    lookup, open and read the caches cannot answer goes through a worker thread)."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the compiled program of the fidelity image")
    src = world_tmp / "src"
    src.mkdir()
    make_tree(src)
    daemon = make_daemon()
    daemon.config = f'storage_guard = "{request.param}"\n'
    image = daemon.images / "fid.sqfs"
    daemon.images.mkdir(parents=True)
    # mksquashfs: the tool real uenv images are built with; it keeps hardlinks, xattrs, times.
    subprocess.run(["mksquashfs", str(src), str(image), "-noappend", "-quiet", "-comp", "gzip",
                    "-no-progress"], check=True, stdout=subprocess.DEVNULL)
    kernel = world_tmp / "kernel"
    kernel.mkdir()
    subprocess.run(["mount", "-t", "squashfs", "-o", "ro,nosuid,nodev,loop", str(image),
                    str(kernel)], check=True)
    try:
        daemon.start()
        yield daemon, kernel
    finally:
        subprocess.run(["umount", str(kernel)], check=True)


def test_tree_equals_kernel_mount(fidelity: tuple[Daemon, Path]) -> None:
    daemon, kernel = fidelity
    ours = snapshot(daemon.mountpoint / "fid")
    theirs = snapshot(kernel)
    assert sorted(ours) == sorted(theirs)
    for rel in theirs:
        assert ours[rel] == theirs[rel], rel
    # The interesting entries really are in the image (the comparison is not vacuous).
    assert ours["hl1"]["nlink"] == 2
    assert ours["hl1"]["same_inode_as"] == ["hl1", "hl2"]
    assert ours["bin/euid"]["mode"] == "-rwsr-xr-x"
    assert ours["private"]["mode"] == "drwx------"
    assert ours["readonly.txt"]["mode"] == "-r--r--r--"
    assert ours["abs"]["target"] == "/etc/hostname"
    assert ours["small.txt"]["xattrs"] == {"user.color": b"blue"}
    assert ours["big.bin"]["size"] == 5 * 1024 * 1024 + 123


def test_random_reads_match(fidelity: tuple[Daemon, Path]) -> None:
    daemon, kernel = fidelity
    ours = (daemon.mountpoint / "fid/big.bin").open("rb")
    theirs = (kernel / "big.bin").open("rb")
    with ours, theirs:
        for offset, size in [(0, 1), (4095, 2), (131071, 131073), (5 * 1024 * 1024, 4096),
                             (5 * 1024 * 1024 + 100, 1000), (10**9, 10)]:
            ours.seek(offset)
            theirs.seek(offset)
            assert ours.read(size) == theirs.read(size), (offset, size)


def test_programs_run_and_setuid_has_no_effect(fidelity: tuple[Daemon, Path]) -> None:
    daemon, _ = fidelity
    image = daemon.mountpoint / "fid"
    result = run_in(image, "./bin/script.sh")
    assert result.stdout == "script ran\n", result.stderr
    result = run_in(image, "setpriv --reuid=65534 --regid=65534 --clear-groups ./bin/euid")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "euid=65534\n"  # setuid root in the image, but nosuid


def test_python_imports_from_the_mount(fidelity: tuple[Daemon, Path]) -> None:
    daemon, _ = fidelity
    code = "import pkg, pkg.mod; print(pkg.VALUE); print(pkg.mod.__file__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(daemon.mountpoint / "fid")},
                            check=False)
    assert result.returncode == 0, result.stderr
    value, origin = result.stdout.splitlines()
    assert value == "imported from the image"
    assert origin == str(daemon.mountpoint / "fid/pkg/mod.py")


def test_other_users_read_what_modes_allow(fidelity: tuple[Daemon, Path]) -> None:
    daemon, _ = fidelity
    image = daemon.mountpoint / "fid"
    nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups "
    assert run_in(image, nobody + "cat small.txt").stdout == "hello uenv\n"
    denied = run_in(image, nobody + "cat private/secret")
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr
