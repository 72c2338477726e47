"""The C library and the system calls uenvfs makes: the one place that loads libc, declares
what it calls, and knows the numbers of the system calls that have no libc function.

Each call has a small wrapper that raises OSError (its errno, and a message that names the
call) instead of returning -1; the modules of kernel/ turn that into their own errors.

A system call without a libc function is made with `syscall(2)` and its number, which depends
on the architecture. `NUMBERS` holds them for the architectures uenvfs knows; on any other (or
in a 32-bit process, whose numbers differ) such a call raises ENOSYS without calling anything,
as on a kernel too old to have it, and the feature that needs it falls back (and says so
once). A wrong number would be another system call: uenvfs never guesses one.

Only the standard library: the keeper imports this too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

AT_FDCWD = -100
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 2

# The numbers of the raw system calls uenvfs makes, by `platform.machine()`, for 64-bit
# processes. The sources, which agree: Linux's tables arch/x86/entry/syscalls/syscall_64.tbl,
# arch/powerpc/kernel/syscalls/syscall.tbl, arch/s390/kernel/syscalls/syscall.tbl and the
# generic table scripts/syscall.tbl (include/uapi/asm-generic/unistd.h before Linux 6.11),
# which arm64, riscv and loongarch use; and glibc's sysdeps/unix/sysv/linux/.../arch-syscall.h
# (x86_64/64, powerpc/powerpc64, s390/s390-64, aarch64, riscv/rv64, loongarch).
# From 424 (Linux 5.1) on, a new call has one number on all of these (mips, alpha and ia64
# add an offset of their own). (open_tree and move_mount are not made: a detached mount handed
# to a user is not locked in its namespace; docs/architecture.md, "A job at /user-environment".)
_SINCE_5_1 = {"openat2": 437, "cachestat": 451}
_GENERIC = {"kcmp": 272, **_SINCE_5_1}
NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {"kcmp": 312, **_SINCE_5_1},
    "aarch64": _GENERIC,
    "aarch64_be": _GENERIC,
    "riscv64": _GENERIC,
    "loongarch64": _GENERIC,
    "ppc64le": {"kcmp": 354, **_SINCE_5_1},
    "ppc64": {"kcmp": 354, **_SINCE_5_1},
    "s390x": {"kcmp": 343, **_SINCE_5_1},
}


def _architecture() -> str:
    """This process's architecture: the kernel's machine name, marked when the process is
    32-bit (x32 or a 32-bit program on a 64-bit kernel: its system call numbers differ)."""
    machine = platform.machine()
    return machine if struct.calcsize("P") == 8 else f"{machine} (32-bit process)"


ARCH = _architecture()

_libc = ctypes.CDLL(None, use_errno=True)
_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_void_p]
_mount.restype = ctypes.c_int
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int
_statx = _libc.statx
_statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                   ctypes.c_void_p]
_statx.restype = ctypes.c_int
_syscall = _libc.syscall  # variadic: the arguments are passed as given
_syscall.restype = ctypes.c_long


def _error(call: str, path: bytes | None = None) -> OSError:
    """The OSError of a failed *call*, from errno (a subclass by errno, as `os` raises)."""
    code = ctypes.get_errno()
    if path is None:
        return OSError(code, f"{call}: {os.strerror(code)}")
    return OSError(code, f"{call}: {os.strerror(code)}", os.fsdecode(path))


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
          data: bytes | None) -> None:
    """mount(2)."""
    if _mount(source, target, fstype, flags, data) != 0:
        raise _error("mount", target)


def umount2(target: bytes, flags: int) -> None:
    """umount2(2)."""
    if _umount2(target, flags) != 0:
        raise _error("umount2", target)


def unshare(flags: int) -> None:
    """unshare(2)."""
    if _unshare(flags) != 0:
        raise _error("unshare")


def statx(path: bytes, flags: int, mask: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    """statx(2) of *path* (relative to the working directory) into *buf* (struct statx)."""
    if _statx(AT_FDCWD, path, flags, mask, buf) != 0:
        raise _error("statx", path)


def number(name: str, arch: str | None = None) -> int | None:
    """The number of the system call *name* on *arch* (this process's by default); None if
    uenvfs does not know it there."""
    return NUMBERS.get(ARCH if arch is None else arch, {}).get(name)


def _call(name: str, *args: object, path: bytes | None = None) -> int:
    """The raw system call *name* (on *path*, for the error); ENOSYS, without any call, where
    its number is unknown. Python ints go as C ints, which libffi widens with their sign: right
    for the descriptors, pids, flags and sizes passed here."""
    nr = number(name)
    if nr is None:
        raise OSError(errno.ENOSYS, f"{name}: uenvfs does not know its number on {ARCH}")
    result: int = _syscall(nr, *args)
    if result == -1:
        raise _error(name, path)
    return result


def kcmp(pid1: int, pid2: int, kind: int, idx1: int, idx2: int) -> int:
    """kcmp(2): 0 if the two kernel objects are one, else 1, 2 or 3 (an ordering)."""
    return _call("kcmp", pid1, pid2, kind, idx1, idx2)


def openat2(dirfd: int, path: bytes, how: object, size: int) -> int:
    """openat2(2); *how* is a reference to a struct open_how of *size* bytes."""
    return _call("openat2", dirfd, path, how, size, path=path)


def cachestat(fd: int, cstat_range: object, cstat: object) -> None:
    """cachestat(2) of the range *cstat_range* of *fd* into *cstat* (references to a struct
    cachestat_range and a struct cachestat)."""
    _call("cachestat", fd, cstat_range, cstat, 0)
