"""The one error hierarchy of uenvfs, and its mapping to errnos.

    UenvfsError                    every error of uenvfs; carries the errno a caller sees
    ├── MountError                 the mount layer (the mount-manager contract: docs/interface.md)
    │   ├── MountFailed            an image could not be mounted
    │   │   └── NodeResourceFailed   ... for want of disk, descriptors or memory (not cached)
    │   ├── UnmountFailed          a backing mount could not be unmounted
    │   └── RefcountInconsistency  a refcount would have gone wrong (a bug)
    ├── CommandError               a refused `.control` command or query of the socket
    └── JournalWriteFailed         the journal could not be written (disk full, I/O error)

    StartupError                   `uenvfs serve` cannot start (not a UenvfsError: no caller
                                   sees it, the server exits with its message)

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
    """An image could not be mounted (missing, corrupt, backend error, timeout).

    `transient` failures are the node's, not the image's (a full or failing state directory,
    no descriptors or memory left): they are not remembered by the negative cache.
    """

    transient = False


class NodeResourceFailed(MountFailed):
    """A mount failed for want of a resource of this node; the image may well be fine."""

    transient = True


# errnos that say something about this node at this moment, not about an image
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE,
                              errno.ENOMEM, errno.EAGAIN, errno.EINTR})


class UnmountFailed(MountError):
    """A backing mount could not be unmounted."""


class RefcountInconsistency(MountError):
    """A refcount would have gone wrong (negative). A bug: logged, never fatal."""


class CommandError(UenvfsError):
    """A refused `.control` command, or a refused query of the query socket (core/queries.py).
    Its errno says why: EINVAL, ENOENT, EPERM, EACCES."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


class JournalWriteFailed(UenvfsError):
    """A state that had to be on disk (an acquisition, a release) could not be written."""


class StartupError(Exception):
    """The daemon cannot start; the message says why (one line for the operator)."""


def errno_of(exc: BaseException) -> int:
    """The errno that a caller should see for *exc*."""
    if isinstance(exc, UenvfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
