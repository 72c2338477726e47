"""Kernel loop mounts by system call: what `mount -o loop` does, without running a program.

Starting mount(8) costs a fork, an exec and the loading of libmount and libblkid: about as
much as the mount itself (3-6 ms of a 4 ms mount here). These functions are blocking; the
backend (or the mounter, through `mount_file`) runs them in a worker thread.

    attach: open the image read-only, LOOP_CTL_GET_FREE, LOOP_CONFIGURE (read-only, autoclear);
            a kernel before 5.8 does not know LOOP_CONFIGURE: there LOOP_SET_FD (read-only, as
            the image and the device are open read-only), then LOOP_SET_STATUS64 (autoclear)
    mount:  mount(2) of /dev/loopN, squashfs, ro,nosuid,nodev; then close our loop fd, so that
            the mount holds the last reference and unmounting detaches the device
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
from pathlib import Path

from . import libc

LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8
LOOP_SET_FD = 0x4C00  # before 5.8: LOOP_SET_FD, then LOOP_SET_STATUS64 (LOOP_CLR_FD to undo)
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_INFO64 = "=5Q4I64s64s32s2Q"  # struct loop_info64
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
ATTEMPTS = 8  # another process may take the free device between asking and configuring it
# What a loop device answers to a request it does not know: EINVAL (lo_ioctl's default case),
# or ENOTTY (the 32-bit compat path, lo_compat_ioctl).
UNKNOWN_REQUEST = (errno.EINVAL, errno.ENOTTY)

# False once this kernel has shown that it does not know LOOP_CONFIGURE (before Linux 5.8):
# from then on this process attaches with LOOP_SET_FD and LOOP_SET_STATUS64 straight away.
use_configure = True

log = logging.getLogger(__name__)


class LoopError(OSError):
    """A system call of a loop mount failed; the message names the call."""


def _fail(call: str, code: int) -> LoopError:
    return LoopError(code, f"{call}: {os.strerror(code)}")


def loop_info64(name: bytes, flags: int) -> bytes:
    """struct loop_info64 with *flags* and the file name *name* (truncated, terminated)."""
    return struct.pack(
        LOOP_INFO64,
        0, 0, 0, 0, 0,  # device, inode, rdevice (read-only), offset, sizelimit
        0, 0, 0, flags,  # number (read-only), encryption type and key size, flags
        name[: LO_NAME_SIZE - 1], b"", b"", 0, 0,
    )


def loop_config(image_fd: int, name: bytes) -> bytes:
    """struct loop_config: fd, block_size, struct loop_info64, reserved."""
    info = loop_info64(name, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR)
    return struct.pack("=II", image_fd, 0) + info + bytes(64)


def _attach(image_fd: int, name: bytes) -> tuple[int, str]:
    """A loop device configured on *image_fd*: (an open fd of it, its path)."""
    control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(ATTEMPTS):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            loop_fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _bind(loop_fd, device, image_fd, name)
            except LoopError as exc:
                os.close(loop_fd)
                if exc.errno == errno.EBUSY:
                    continue  # taken meanwhile: ask again
                raise
            return loop_fd, device
    finally:
        os.close(control)
    raise _fail("no free loop device", errno.EBUSY)


def _bind(loop_fd: int, device: str, image_fd: int, name: bytes) -> None:
    """Bind the free loop device open as *loop_fd* to *image_fd*: read-only, autoclear."""
    global use_configure
    if not use_configure:
        _set_fd(loop_fd, device, image_fd, name)
        return
    try:
        fcntl.ioctl(loop_fd, LOOP_CONFIGURE, loop_config(image_fd, name))
        return
    except OSError as exc:
        if exc.errno not in UNKNOWN_REQUEST:
            raise _fail(f"LOOP_CONFIGURE {device}", exc.errno or errno.EIO) from exc
    # Unknown, or a real EINVAL; then the old way fails too, and says why.
    _set_fd(loop_fd, device, image_fd, name)
    use_configure = False
    log.info("this kernel does not know LOOP_CONFIGURE (Linux 5.8): loop devices are set "
             "up with LOOP_SET_FD and LOOP_SET_STATUS64")


def _set_fd(loop_fd: int, device: str, image_fd: int, name: bytes) -> None:
    """The way before LOOP_CONFIGURE, in two steps. LOOP_SET_FD binds the device, read-only
    as the image and the device are open read-only (LOOP_SET_STATUS64 cannot set read-only);
    then LOOP_SET_STATUS64 sets autoclear and the file name, or LOOP_CLR_FD unbinds again."""
    try:
        fcntl.ioctl(loop_fd, LOOP_SET_FD, image_fd)
    except OSError as exc:
        raise _fail(f"LOOP_SET_FD {device}", exc.errno or errno.EIO) from exc
    try:
        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, loop_info64(name, LO_FLAGS_AUTOCLEAR))
    except OSError as exc:
        with contextlib.suppress(OSError):
            fcntl.ioctl(loop_fd, LOOP_CLR_FD)
        raise _fail(f"LOOP_SET_STATUS64 {device}", exc.errno or errno.EIO) from exc


def mount_image(image: Path, target: Path) -> str:
    """Mount *image* (squashfs) read-only, nosuid, nodev at *target*; return the loop device."""
    image_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mount_file(image_fd, image, target)
    finally:
        os.close(image_fd)  # the loop device holds the file now


def mount_file(image_fd: int, image: Path, target: Path) -> str:
    """`mount_image` of the file open read-only as *image_fd* (named *image*): the very file
    the caller has checked, whatever *image* names by now. The caller closes *image_fd*."""
    loop_fd, device = _attach(image_fd, os.fsencode(image))
    try:
        flags = libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV
        libc.mount(device.encode(), os.fsencode(target), b"squashfs", flags, None)
    except OSError as exc:
        raise _fail(f"mount {device} on {target} (squashfs)", exc.errno or errno.EIO) from exc
    finally:
        os.close(loop_fd)  # autoclear: the device goes with its last user
    return device


def unmount(target: Path, *, lazy: bool = False) -> None:
    """umount2(2) of *target*; *lazy* detaches it even while busy (MNT_DETACH)."""
    try:
        libc.umount2(os.fsencode(target), libc.MNT_DETACH if lazy else 0)
    except OSError as exc:
        raise _fail(f"umount {target}", exc.errno or errno.EIO) from exc


def backing_identity(device: str) -> tuple[int, int] | None:
    """The (st_dev, st_ino) of the file behind the loop device *device*, as the kernel knows
    it (also when that file was deleted or renamed since); None if it is not a loop device."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(struct.calcsize(LOOP_INFO64)))
    except OSError:
        return None
    finally:
        os.close(fd)
    lo_device, lo_inode = struct.unpack_from("=2Q", info)
    return lo_device, lo_inode
