"""The FUSE adapter's path rules, against a plain directory standing in for a backing mount.

No FUSE mount is needed: the handlers are called directly, the way pyfuse3 would, so that even
requests the kernel would never send (a lookup under a symlink) can be tried.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from uenvfs.core.config import Config
from uenvfs.core.model import InodePrefixes
from uenvfs.fuse.fs import UenvFS
from uenvfs.fuse.inodes import ROOT
from uenvfs.image.catalog import Catalog

from ..fakes import FakeBackend
from ..parts import make_parts


@dataclass
class Ctx:
    """What pyfuse3 passes as the request context."""

    pid: int = os.getpid()
    uid: int = 0
    gid: int = 0
    umask: int = 0o022


class DirBackend(FakeBackend):
    """'Mounts' an image by pointing its backing directory at a prepared tree."""

    def __init__(self, trees: dict[str, Path]) -> None:
        super().__init__(delay=0)
        self.trees = trees

    async def mount(self, image: Path, target: Path) -> None:
        await super().mount(image, target)
        os.rmdir(target)
        os.symlink(self.trees[target.name], target)


@pytest.fixture
async def fs(tmp_path: Path) -> AsyncIterator[UenvFS]:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "dir/file").write_text("inside\n")
    (tree / "evil").symlink_to("/etc")
    (tree / "evil2").symlink_to("../../../../../../etc")
    images = tmp_path / "images"
    images.mkdir()
    (images / "img.sqfs").write_bytes(b"image")
    catalog = Catalog([images])
    catalog.refresh()
    config = Config(images=(images,), state_dir=tmp_path / "state", validate=False)
    prefixes = InodePrefixes()
    parts = make_parts(config, DirBackend({"img": tree}), catalog, prefixes)
    async with trio.open_nursery() as nursery:
        await nursery.start(parts.manager.run)
        fs = UenvFS(parts.images, parts.executor, prefixes)
        parts.manager.listen(fs.listener)
        yield fs
        nursery.cancel_scope.cancel()


async def errno_of(call: Any) -> int:
    try:
        await call
    except pyfuse3.FUSEError as exc:
        return exc.errno
    raise AssertionError("no error")


async def test_symlinks_are_served_as_symlinks_and_never_followed(fs: UenvFS) -> None:
    ctx: Any = Ctx()
    image = await fs.lookup(ROOT, b"img", ctx)
    await fs.opendir(image.st_ino, ctx)  # mounts it
    evil = await fs.lookup(image.st_ino, b"evil", ctx)
    assert stat.S_ISLNK(evil.st_mode)
    assert await fs.readlink(evil.st_ino, ctx) == b"/etc"
    # Requests the kernel never sends, tried anyway: nothing resolves through the symlink.
    assert await errno_of(fs.lookup(evil.st_ino, b"passwd", ctx)) == errno.ENOTDIR
    assert await errno_of(fs.opendir(evil.st_ino, ctx)) == errno.ENOTDIR
    assert await errno_of(fs.open(evil.st_ino, os.O_RDONLY, ctx)) == errno.ELOOP
    evil2 = await fs.lookup(image.st_ino, b"evil2", ctx)
    assert await errno_of(fs.lookup(evil2.st_ino, b"hostname", ctx)) == errno.ENOTDIR
    assert await fs.listxattr(evil.st_ino, ctx) == []


async def test_names_that_are_not_one_component_are_enoent(fs: UenvFS) -> None:
    ctx: Any = Ctx()
    image = await fs.lookup(ROOT, b"img", ctx)
    for name in (b"..", b".", b"dir/file", b"../img", b"img/../.."):
        assert await errno_of(fs.lookup(image.st_ino, name, ctx)) == errno.ENOENT, name
        assert await errno_of(fs.lookup(ROOT, name, ctx)) == errno.ENOENT, name
    assert await errno_of(fs.lookup(ROOT, b"\xff", ctx)) == errno.ENOENT
    # Inside an image, a missing name is a negative entry the kernel may cache (inode 0).
    for name in (b"\xff", b"missing", b"x" * 255):
        assert (await fs.lookup(image.st_ino, name, ctx)).st_ino == 0, name
    assert await errno_of(fs.lookup(image.st_ino, b"x" * 256, ctx)) == errno.ENAMETOOLONG
    for name in (b"images", b"img.sqfs", b"state", b"tree", b"x" * 300):
        assert await errno_of(fs.lookup(ROOT, name, ctx)) == errno.ENOENT, name


async def test_a_listed_directory_answers_lookups_without_the_backing_mount(
    fs: UenvFS, tmp_path: Path
) -> None:
    """An image never changes, so once a directory was listed (readdir) its names, present
    or missing, are answered from the listing: after drop_caches that saves a disk read per
    lookup. Shown here by changing the stand-in tree behind the daemon's back."""
    ctx: Any = Ctx()
    image = await fs.lookup(ROOT, b"img", ctx)
    d = await fs.lookup(image.st_ino, b"dir", ctx)
    fh = await fs.opendir(d.st_ino, ctx)
    await fs.releasedir(fh)
    real = os.lstat(tmp_path / "tree/dir/file")
    (tmp_path / "tree/dir/file").unlink()
    (tmp_path / "tree/dir/new").write_text("not in the listing\n")
    f = await fs.lookup(d.st_ino, b"file", ctx)
    assert (f.st_ino & ((1 << 44) - 1), f.st_size, f.st_mode) == (
        real.st_ino, real.st_size, real.st_mode)
    assert (await fs.lookup(d.st_ino, b"new", ctx)).st_ino == 0  # a negative entry
    assert await errno_of(fs.lookup(d.st_ino, b"x" * 256, ctx)) == errno.ENAMETOOLONG
    # Not listed: asked of the backing mount.
    assert (await fs.lookup(image.st_ino, b"evil", ctx)).st_ino != 0


async def test_unknown_inodes_are_stale_and_files_are_not_directories(fs: UenvFS) -> None:
    ctx: Any = Ctx()
    assert await errno_of(fs.getattr(pyfuse3.InodeT(123456789), ctx)) == errno.ESTALE
    image = await fs.lookup(ROOT, b"img", ctx)
    d = await fs.lookup(image.st_ino, b"dir", ctx)
    f = await fs.lookup(d.st_ino, b"file", ctx)
    assert await errno_of(fs.lookup(f.st_ino, b"x", ctx)) == errno.ENOTDIR
    assert await errno_of(fs.opendir(f.st_ino, ctx)) == errno.ENOTDIR
    assert await errno_of(fs.open(f.st_ino, os.O_WRONLY, ctx)) == errno.EROFS
    info = await fs.open(f.st_ino, os.O_RDONLY, ctx)
    assert await fs.read(info.fh, 0, 100) == b"inside\n"
    await fs.release(info.fh)
