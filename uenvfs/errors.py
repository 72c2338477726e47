"""The one error hierarchy of uenvfs, and its mapping to errnos.

    UenvfsError                    every error of uenvfs; carries the errno a caller sees
    ├── MountError                 the mount layer (the node agent's mount-manager contract)
    │   ├── MountFailed            an image could not be mounted
    │   ├── UnmountFailed          a backing mount could not be unmounted
    │   └── RefcountInconsistency  a refcount would have gone wrong (a bug)
    └── CommandError               a refused `.control` command

What a caller sees through the filesystem is the errno from `errno_of`.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence


class UenvfsError(Exception):
    """Base of every uenvfs error.

    `errno` is what a FUSE or `.control` caller receives. When an external tool failed,
    `command` and `stderr` say which and why, so that no error is opaque.
    """

    errno: int = errno.EIO

    def __init__(
        self, message: str, command: Sequence[str] = (), stderr: str = ""
    ) -> None:
        self.command = list(command)
        self.stderr = stderr.strip()
        if self.stderr:
            message = f"{message}: {self.stderr}"
        super().__init__(message)


class MountError(UenvfsError):
    """Base of every failure of the mount layer (mounting, unmounting, refcounting)."""


class MountFailed(MountError):
    """An image could not be mounted (missing, corrupt, backend error, timeout)."""


class UnmountFailed(MountError):
    """A backing mount could not be unmounted."""


class RefcountInconsistency(MountError):
    """A refcount would have gone wrong (negative). A bug: logged, never fatal."""


class CommandError(UenvfsError):
    """A refused `.control` command. Its errno says why: EINVAL, ENOENT, EPERM, EACCES."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


def errno_of(exc: BaseException) -> int:
    """The errno that a caller should see for *exc*."""
    if isinstance(exc, UenvfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
