"""Kernels older than uenvfs would like: loop devices set up without LOOP_CONFIGURE (before
Linux 5.8), on real images and real loop devices; and the line `serve` refuses a kernel without
pidfd_open (before 5.3) with."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from uenvfs.keeper import serve
from uenvfs.kernel import loop

from ..mounts import clean_up, is_mounted, loops_for
from ..support import build_image, wait_until

LOOP_REASON = None
if os.geteuid() != 0:
    LOOP_REASON = "needs root (loop devices, mount)"
elif not os.path.exists(loop.LOOP_CONTROL):
    LOOP_REASON = f"needs {loop.LOOP_CONTROL}"
elif shutil.which("gensquashfs") is None:
    LOOP_REASON = "needs gensquashfs (squashfs-tools-ng) to build test images"
# In CI (root, loop devices and gensquashfs are there) the test runs, and fails if it cannot.
needs_loop = pytest.mark.skipif(LOOP_REASON is not None and not os.environ.get("CI"),
                                reason=LOOP_REASON or "")

UNKNOWN_LOOP_REQUEST = 0x4CFF  # no loop ioctl: the kernel answers as a 5.7 one to LOOP_CONFIGURE


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory for an image and its mountpoint; no mount or loop device of it survives."""
    yield tmp_path
    left = clean_up(tmp_path)
    assert not left, f"left behind: {', '.join(left)}"


def loop_status(device: str) -> tuple[int, bytes]:
    """(lo_flags, lo_file_name) of the loop device *device*, by LOOP_GET_STATUS64."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = fcntl.ioctl(fd, loop.LOOP_GET_STATUS64, bytes(struct.calcsize(loop.LOOP_INFO64)))
    finally:
        os.close(fd)
    fields = struct.unpack(loop.LOOP_INFO64, info)
    return fields[8], fields[9].rstrip(b"\0")


@needs_loop
@pytest.mark.parametrize("way", ["configure", "forced", "detected"])
def test_loop_mount_with_and_without_loop_configure(scratch: Path, way: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """configure: LOOP_CONFIGURE, as on this kernel. forced: straight to LOOP_SET_FD and
    LOOP_SET_STATUS64, as once a process knows LOOP_CONFIGURE is unknown. detected: the kernel
    refuses the request (EINVAL), the fallback takes over, and the process remembers."""
    monkeypatch.setattr(loop, "use_configure", way != "forced")  # restored afterwards
    if way == "detected":
        monkeypatch.setattr(loop, "LOOP_CONFIGURE", UNKNOWN_LOOP_REQUEST)
    image = build_image(scratch / "tools.sqfs", {"README": "read me\n", "share/data.txt": "42\n"})
    target = scratch / "mnt"
    target.mkdir()

    device = loop.mount_image(image, target)
    sysfs = Path("/sys/block") / Path(device).name
    try:
        assert loop.use_configure is (way == "configure")
        assert (target / "share" / "data.txt").read_text() == "42\n"
        assert (sysfs / "ro").read_text() == "1\n"
        assert (sysfs / "loop" / "autoclear").read_text() == "1\n"
        assert (sysfs / "loop" / "backing_file").read_text() == f"{image}\n"
        flags, name = loop_status(device)
        assert flags & loop.LO_FLAGS_READ_ONLY
        assert flags & loop.LO_FLAGS_AUTOCLEAR
        assert name == os.fsencode(image)[: loop.LO_NAME_SIZE - 1]  # as much as fits
        stat = image.stat()
        assert loop.backing_identity(device) == (stat.st_dev, stat.st_ino)
    finally:
        if is_mounted(target):
            loop.unmount(target)
    # The mount held the device's last reference: its unmount detached it (autoclear).
    wait_until(lambda: not (sysfs / "loop" / "backing_file").exists(),
               what=f"{device} to be detached")


@needs_loop
def test_a_failed_set_status_unbinds_the_device(scratch: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """LOOP_SET_FD bound the device, LOOP_SET_STATUS64 failed: LOOP_CLR_FD unbinds it, and the
    mount fails with the call that failed."""
    monkeypatch.setattr(loop, "use_configure", False)
    monkeypatch.setattr(loop, "LOOP_SET_STATUS64", UNKNOWN_LOOP_REQUEST)
    image = build_image(scratch / "tools.sqfs", {"README": "read me\n"})
    target = scratch / "mnt"
    target.mkdir()
    with pytest.raises(loop.LoopError, match=r"^\[Errno 22\] LOOP_SET_STATUS64 /dev/loop\d+: "):
        loop.mount_image(image, target)
    assert not is_mounted(target)
    wait_until(lambda: not loops_for(scratch), what=f"no loop device bound to {image}")


def test_refusal_without_pidfd_open() -> None:
    assert serve.kernel_refusal(errno.ENOSYS, "5.2.21") == (
        "uenvfs needs Linux 5.3 or later (pidfd_open); this kernel is 5.2.21")
    # A kernel that has it but a seccomp filter that forbids it (old container runtimes).
    assert serve.kernel_refusal(errno.EPERM, "5.10.0") == (
        "uenvfs needs pidfd_open (Linux 5.3 or later), which fails here: Operation not "
        "permitted (kernel 5.10.0; a seccomp filter?)")


def test_this_kernel_is_not_refused() -> None:
    assert serve.check_kernel() is None  # the tests run on Linux 5.3 or later
