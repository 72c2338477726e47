"""The mounter's first access with a backend that mounts an open file: the image file's check
and the mount in one worker thread, the version checked before it is mounted."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import trio

from uenvfs.core.config import Config
from uenvfs.core.errors import MountFailed
from uenvfs.core.metrics import Metrics
from uenvfs.core.model import InodePrefixes
from uenvfs.image import squashfs
from uenvfs.image.catalog import Catalog
from uenvfs.manager.backend import FileMountBackend
from uenvfs.manager.mounting import Mounter

from ..fakes import FakeBackend


class FileBackend(FakeBackend):
    """Mounts an open image file: records the identity of the file it was given."""

    def __init__(self) -> None:
        super().__init__(delay=0)
        self.files: list[tuple[int, int, int, int]] = []  # identity of each file mounted
        self.threads: list[str] = []
        self.error: OSError | None = None
        self.hang: threading.Event | None = None

    async def mount(self, image: Path, target: Path) -> None:
        raise AssertionError("a file backend is mounted through mount_file")

    def mount_file(self, image_fd: int, image: Path, target: Path) -> str:
        self.threads.append(threading.current_thread().name)
        if self.hang is not None:
            self.hang.wait(10)
        if self.error is not None:
            raise self.error
        st = os.fstat(image_fd)
        self.files.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        self.table[target] = source = f"/dev/loop{len(self.files)}"
        return source


def make(tmp_path: Path, *, validate: bool = True, threads: bool = False,
         timeout: float = 30.0) -> tuple[Mounter, FileBackend, Path]:
    images = tmp_path / "images"
    images.mkdir()
    image = images / "img.sqfs"
    image.write_bytes(b"first")
    catalog = Catalog([images])
    catalog.refresh()
    config = Config(images=(images,), state_dir=tmp_path / "state", validate=validate,
                    mount_timeout=timeout)
    backend = FileBackend()
    assert isinstance(backend, FileMountBackend)
    mounter = Mounter(config, backend, catalog, Metrics(), InodePrefixes(), trio.current_time,
                      lambda name: None, threads=threads)
    return mounter, backend, image


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, int]]:
    """Every image check (its header and size, read with the identity); all pass."""
    seen: list[tuple[bytes, int]] = []

    async def check(image: Path, header: bytes, size: int, time_limit: float) -> str | None:
        seen.append((header, size))
        return None

    monkeypatch.setattr(squashfs, "check_read_image", check)
    return seen


async def test_a_checked_version_is_mounted_in_the_probe(
    tmp_path: Path, checks: list[tuple[bytes, int]]
) -> None:
    mounter, backend, _ = make(tmp_path)
    first = await mounter.mount("img")  # a new version: checked, then mounted
    assert checks == [(b"first", 5)]
    assert first.source == "/dev/loop1"
    assert backend.files == [first.version.identity]
    del backend.table[first.backing]
    again = await mounter.mount("img")  # the same version: no check, mounted at once
    assert len(checks) == 1
    assert again.version is first.version
    assert backend.files[1] == first.version.identity


async def test_without_validation_the_first_probe_mounts(tmp_path: Path) -> None:
    mounter, backend, _ = make(tmp_path, validate=False)
    mount = await mounter.mount("img")
    assert backend.files == [mount.version.identity]


async def test_an_image_replaced_during_its_check_is_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounter, backend, image = make(tmp_path)
    checked: list[bytes] = []

    async def check(path: Path, header: bytes, size: int, time_limit: float) -> str | None:
        checked.append(header)
        if len(checked) == 1:
            replacement = image.with_name("new.tmp")
            replacement.write_bytes(b"second")
            os.replace(replacement, image)
        return None

    monkeypatch.setattr(squashfs, "check_read_image", check)
    mount = await mounter.mount("img")
    assert checked == [b"first", b"second"]  # what is mounted is what was checked
    assert backend.files == [mount.version.identity]
    assert mount.version.identity[2] == len(b"second")


async def test_the_mount_runs_in_a_worker_thread(tmp_path: Path) -> None:
    mounter, backend, _ = make(tmp_path, validate=False, threads=True)
    await mounter.mount("img")
    assert len(backend.threads) == 1
    assert backend.threads[0] != threading.current_thread().name


async def test_errors_of_the_mount_step(tmp_path: Path) -> None:
    mounter, backend, _ = make(tmp_path, validate=False, threads=True)
    backend.error = OSError(errno.EBUSY, "LOOP_CONFIGURE /dev/loop0: Device or resource busy")
    with pytest.raises(MountFailed, match="LOOP_CONFIGURE") as failed:
        await mounter.mount("img")
    assert not failed.value.transient


async def test_a_hung_mount_step_is_abandoned_in_time(tmp_path: Path) -> None:
    mounter, backend, _ = make(tmp_path, validate=False, threads=True, timeout=0.2)
    backend.hang = threading.Event()
    try:
        with pytest.raises(MountFailed, match=r"mount of .*img.sqfs .* no answer in 0.2 s"):
            await mounter.mount("img")
    finally:
        backend.hang.set()


async def test_an_image_that_is_no_regular_file_fails_its_probe(tmp_path: Path) -> None:
    mounter, backend, image = make(tmp_path, validate=False)
    image.unlink()
    image.mkdir()  # still named, not a regular file
    with pytest.raises(MountFailed, match="not a regular file"):
        await mounter.mount("img")
    assert backend.files == []
