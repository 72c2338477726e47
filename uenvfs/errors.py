"""The one error hierarchy of uenvfs, and its mapping to errnos.

It mirrors the node agent's mount-manager contract: every failure of the mount layer is a
`MountError`; what a caller sees through the filesystem is the errno from `errno_of`.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence


class MountError(Exception):
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


class MountFailed(MountError):
    """An image could not be mounted (missing, corrupt, backend error, timeout)."""


class UnmountFailed(MountError):
    """A backing mount could not be unmounted."""


class RefcountInconsistency(MountError):
    """A refcount would have gone wrong (negative). A bug: logged, never fatal."""


class CommandError(MountError):
    """A refused `.control` command. Its errno says why: EINVAL, ENOENT, EPERM, EACCES."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


def errno_of(exc: BaseException) -> int:
    """The errno that a caller should see for *exc*."""
    if isinstance(exc, MountError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
