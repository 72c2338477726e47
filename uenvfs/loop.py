"""Kernel loop mounts by system call: what `mount -o loop` does, without running a program.

Starting mount(8) costs a fork, an exec and the loading of libmount and libblkid: about as
much as the mount itself (3-6 ms of a 4 ms mount here). These functions are blocking; the
backend (or the mounter, through `mount_file`) runs them in a worker thread.

    attach: open the image read-only, LOOP_CTL_GET_FREE, LOOP_CONFIGURE (read-only, autoclear)
    mount:  mount(2) of /dev/loopN, squashfs, ro,nosuid,nodev; then close our loop fd, so that
            the mount holds the last reference and unmounting detaches the device
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from pathlib import Path

LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8
LOOP_GET_STATUS64 = 0x4C05
LOOP_INFO64 = "=5Q4I64s64s32s2Q"  # struct loop_info64
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
ATTEMPTS = 8  # another process may take the free device between asking and configuring it

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class LoopError(OSError):
    """A system call of a loop mount failed; the message names the call."""


def _fail(call: str, code: int) -> LoopError:
    return LoopError(code, f"{call}: {os.strerror(code)}")


def loop_config(image_fd: int, name: bytes) -> bytes:
    """struct loop_config: fd, block_size, struct loop_info64, reserved."""
    info = struct.pack(
        LOOP_INFO64,
        0, 0, 0, 0, 0,  # device, inode, rdevice (read-only), offset, sizelimit
        0, 0, 0, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,  # number, encryption x2, flags
        name[: LO_NAME_SIZE - 1], b"", b"", 0, 0,
    )
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
                fcntl.ioctl(loop_fd, LOOP_CONFIGURE, loop_config(image_fd, name))
            except OSError as exc:
                os.close(loop_fd)
                if exc.errno == errno.EBUSY:
                    continue  # taken meanwhile: ask again
                raise _fail(f"LOOP_CONFIGURE {device}", exc.errno or errno.EIO) from exc
            return loop_fd, device
    finally:
        os.close(control)
    raise _fail("no free loop device", errno.EBUSY)


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
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV
        if _libc.mount(device.encode(), os.fsencode(target), b"squashfs", flags, None) != 0:
            raise _fail(f"mount {device} on {target} (squashfs)", ctypes.get_errno())
    finally:
        os.close(loop_fd)  # autoclear: the device goes with its last user
    return device


def unmount(target: Path, *, lazy: bool = False) -> None:
    """umount2(2) of *target*; *lazy* detaches it even while busy (MNT_DETACH)."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        raise _fail(f"umount {target}", ctypes.get_errno())


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
