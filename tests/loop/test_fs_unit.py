"""The FUSE adapter's path rules, against a plain directory standing in for a backing mount,
and its answers when an image is unmounted while a request waits for a worker thread.

No FUSE mount is needed: the handlers are called directly, the way pyfuse3 would, so that even
requests the kernel would never send (a lookup under a symlink) can be tried, and a worker
thread can be made to start late.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from uenvfs.core.config import Config
from uenvfs.core.model import InodePrefixes
from uenvfs.fuse.fs import UenvFS
from uenvfs.fuse.inodes import ROOT, STATUS
from uenvfs.image.catalog import Catalog

from ..fakes import FakeBackend
from ..parts import Parts, make_parts


@dataclass
class Ctx:
    """What pyfuse3 passes as the request context."""

    pid: int = os.getpid()
    uid: int = 0
    gid: int = 0
    umask: int = 0o022


class DirBackend(FakeBackend):
    """'Mounts' an image by pointing its backing directory at a prepared tree; unmounting
    leaves the empty directory again, as a real unmount does."""

    def __init__(self, trees: dict[str, Path]) -> None:
        super().__init__(delay=0)
        self.trees = trees

    async def mount(self, image: Path, target: Path) -> None:
        await super().mount(image, target)
        os.rmdir(target)
        os.symlink(self.trees[target.name], target)

    async def unmount(self, target: Path, *, lazy: bool = False) -> None:
        await super().unmount(target, lazy=lazy)
        os.unlink(target)
        os.mkdir(target)


@asynccontextmanager
async def serving(tmp_path: Path, **options: Any) -> AsyncIterator[tuple[UenvFS, Parts]]:
    """A filesystem serving the image `img` (a tree with a directory, a file and symlinks
    out of it), configured with *options*; and the manager's parts."""
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
    config = Config(images=(images,), state_dir=tmp_path / "state", validate=False, **options)
    prefixes = InodePrefixes()
    parts = make_parts(config, DirBackend({"img": tree}), catalog, prefixes)
    async with trio.open_nursery() as nursery:
        await nursery.start(parts.manager.run)
        fs = UenvFS(parts.images, parts.executor, prefixes)
        parts.manager.listen(fs.listener)
        yield fs, parts
        nursery.cancel_scope.cancel()


@pytest.fixture
async def fs(tmp_path: Path) -> AsyncIterator[UenvFS]:
    async with serving(tmp_path) as (fs, _):
        yield fs


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


# -- requests that wait for a worker thread while the image may be unmounted ----------------


@dataclass
class HeldUp:
    """The worker threads of the filesystem, held up: a call waits until `go` is set."""

    asked: trio.Event
    go: trio.Event


def hold_up_worker_threads(fs: UenvFS, monkeypatch: pytest.MonkeyPatch) -> HeldUp:
    """Every call to a worker thread of an image waits for `go` (as a thread started late on
    a loaded machine does); `asked` is set once one waits."""
    held = HeldUp(trio.Event(), trio.Event())
    run = fs.workers.run

    async def late(image: str, fn: Any, *args: object) -> Any:
        held.asked.set()
        await held.go.wait()
        return await run(image, fn, *args)

    monkeypatch.setattr(fs.workers, "run", late)
    return held


async def test_an_image_stays_mounted_while_a_directory_of_it_is_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """The first opendir of a directory lists it in a worker thread. It uses the image from
    the start: its hold timer must not unmount the image under the listing, which would then
    read the empty backing directory (ENOENT for a directory inside: the rare failure of
    test_twenty_crashes_under_churn on a loaded machine, where every new server lists anew)."""
    ctx: Any = Ctx()
    async with serving(tmp_path) as (fs, parts):
        parts.settings.set_hold_time(0.05)
        image = await fs.lookup(ROOT, b"img", ctx)
        d = await fs.lookup(image.st_ino, b"dir", ctx)  # mounted now, idle: its timer runs
        held = hold_up_worker_threads(fs, monkeypatch)
        opened: list[pyfuse3.FileHandleT] = []

        async def opendir() -> None:
            opened.append(await fs.opendir(d.st_ino, ctx))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(opendir)
            await held.asked.wait()
            await trio.sleep(1)  # 20 hold times
            assert fs.images.mounted("img") is not None
            held.go.set()
        entries, _ = fs.handles[opened[0]].listing()
        assert [name for name, _ in entries] == [b".", b"..", b"file"]
        await fs.releasedir(opened[0])
        await trio.sleep(1)
        assert fs.images.mounted("img") is None  # its hold timer runs again once released


async def test_a_listing_read_while_the_image_went_away_is_stale_and_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A force-unmount while a directory is listed: the listing read the empty backing
    directory. It is ESTALE (the kernel looks the path up again), and it is not kept: an
    image's root replayed empty would make every name in it a negative entry for good."""
    ctx: Any = Ctx()
    async with serving(tmp_path) as (fs, parts):
        image = await fs.lookup(ROOT, b"img", ctx)
        await fs.lookup(image.st_ino, b"dir", ctx)  # mounts it
        held = hold_up_worker_threads(fs, monkeypatch)
        failed: list[int] = []

        async def opendir() -> None:
            failed.append(await errno_of(fs.opendir(image.st_ino, ctx)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(opendir)
            await held.asked.wait()
            await parts.manager.force_unmount("img")
            held.go.set()
        assert failed == [errno.ESTALE]
        fh = await fs.opendir(image.st_ino, ctx)  # mounts it again, and lists it
        entries, _ = fs.handles[fh].listing()
        assert sorted(name for name, _ in entries) == [b".", b"..", b"dir", b"evil", b"evil2"]
        await fs.releasedir(fh)


async def test_on_guarded_storage_an_answer_about_an_image_that_went_away_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """On guarded storage a request waits for a worker thread, without using the image; if
    its hold timer unmounts it meanwhile, what the thread finds missing is missing from the
    empty backing directory, not from the image: ESTALE (the kernel looks the path up
    again), never ENOENT (which a lookup would answer as a negative entry, kept an hour)."""
    ctx: Any = Ctx()
    async with serving(tmp_path, storage_guard="always") as (fs, parts):
        parts.settings.set_hold_time(0.05)
        image = await fs.lookup(ROOT, b"img", ctx)
        link = await fs.lookup(image.st_ino, b"evil", ctx)
        held = hold_up_worker_threads(fs, monkeypatch)
        failed: list[int] = []

        async def readlink() -> None:
            failed.append(await errno_of(fs.readlink(link.st_ino, ctx)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(readlink)
            await held.asked.wait()
            await trio.sleep(1)
            assert fs.images.mounted("img") is None  # unmounted under the readlink
            held.go.set()
        assert failed == [errno.ESTALE]
        monkeypatch.undo()
        parts.settings.set_hold_time(60)  # autojump: no unmount while the next thread works
        assert await fs.readlink(link.st_ino, ctx) == b"/etc"  # mounted again


async def test_on_guarded_storage_an_image_stays_mounted_while_a_file_of_it_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """An open that waits for a worker thread (on guarded storage, when the kernel's caches
    cannot answer) uses the image from the start, as an opendir does."""
    ctx: Any = Ctx()
    async with serving(tmp_path, storage_guard="always") as (fs, parts):
        parts.settings.set_hold_time(0.05)
        image = await fs.lookup(ROOT, b"img", ctx)
        # A use while names are looked up (a lookup is none, and on guarded storage it may
        # wait for a thread, while the test's clock jumps past the hold time).
        keep = await fs.opendir(image.st_ino, ctx)
        d = await fs.lookup(image.st_ino, b"dir", ctx)
        f = await fs.lookup(d.st_ino, b"file", ctx)
        monkeypatch.setattr("uenvfs.fuse.files.cache.open_cached", lambda path, flags: None)
        held = hold_up_worker_threads(fs, monkeypatch)
        await fs.releasedir(keep)
        opened: list[pyfuse3.FileInfo] = []

        async def open_file() -> None:
            opened.append(await fs.open(f.st_ino, os.O_RDONLY, ctx))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_file)
            await held.asked.wait()
            await trio.sleep(1)
            assert fs.images.mounted("img") is not None
            held.go.set()
        assert await fs.read(opened[0].fh, 0, 100) == b"inside\n"
        await fs.release(opened[0].fh)


async def test_root_and_status_handles_share_their_snapshot_and_count_for_their_uid(
    fs: UenvFS,
) -> None:
    ctx: Any = Ctx(uid=1000)
    root = [await fs.opendir(ROOT, ctx) for _ in range(3)]
    listing = fs.handles[root[0]].listing()[0]
    assert all(fs.handles[fh].listing()[0] is listing for fh in root)
    status = [(await fs.open(STATUS, os.O_RDONLY, ctx)).fh for _ in range(3)]
    data = await fs.read(status[0], 0, 1 << 20)
    assert json.loads(data)["mounts"] == []
    assert fs.shares.held == {1000: 6}
    assert fs.shares.pinned == {1000: listing.memory + len(data)}  # each snapshot once
    image = await fs.lookup(ROOT, b"img", ctx)
    fh = await fs.opendir(image.st_ino, ctx)  # mounts it: the root's listing changes
    assert fs.handles[await fs.opendir(ROOT, ctx)].listing()[0] is not listing
    assert list(fs.shares.allocations) == [1000]  # the image directory counts for one
    for number in [*root, fh]:
        await fs.releasedir(number)
    for number in status:
        await fs.release(number)
    assert fs.shares.held == {1000: 1}
