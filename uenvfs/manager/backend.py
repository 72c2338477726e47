"""Backing mounts: the kernel's squashfs on a loop device, or squashfuse.

Every mount tool runs through `run_tool` (`tools.run`, with a time limit), and every failure
becomes a `MountFailed` or `UnmountFailed` that carries the command and its stderr.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import trio

from ..core.errors import MountError, MountFailed, UnmountFailed
from ..image import tools
from ..kernel import loop, mountinfo

MOUNT_OPTIONS = "ro,nosuid,nodev"


def is_mount_point(path: Path) -> bool:
    """Whether something is mounted at *path*: two stats, cheaper than reading mountinfo."""
    return os.path.ismount(path)


async def run_tool(
    command: Sequence[str], time_limit: float, error: type[MountError] = MountFailed
) -> str:
    """Run a mount tool; return its stdout. Raises *error* with the command and its stderr.

    A tool still running after *time_limit* seconds is killed, and that is an error too.
    """
    result = await tools.run(command, time_limit, error=error, check=True)
    return result.stdout.decode("utf-8", "replace")


class MountBackend(Protocol):
    """A way of mounting an image read-only at a directory."""

    name: str
    fstype: str
    timeout: float  # seconds a mount or unmount may take (mount_timeout)

    def missing_tools(self) -> list[str]: ...

    def mounted(self, target: Path) -> str | None:
        """The source of the mount at *target* (e.g. its loop device), or None."""
        ...

    async def mount(self, image: Path, target: Path) -> None: ...

    async def unmount(self, target: Path, *, lazy: bool = False) -> None: ...


@runtime_checkable
class FileMountBackend(MountBackend, Protocol):
    """A backend whose mount is a blocking call on an open image file.

    The mounter then checks the image file and mounts it in one worker thread (one thread hop
    per first access, not two), and mounts the very file it checked.
    """

    def mount_file(self, image_fd: int, image: Path, target: Path) -> str:
        """Mount the image file open as *image_fd* at *target* (blocking: for a worker
        thread); return the mount's source. Raises OSError."""
        ...


def _mounted(target: Path) -> str | None:
    entry = mountinfo.mount_at(target)
    return None if entry is None else entry.source


def _missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


@dataclass
class KernelBackend:
    """The kernel's squashfs on a loop device (root only), set up by system calls in a worker
    thread (see kernel/loop.py); unmounting detaches the loop device (autoclear)."""

    timeout: float = 30.0
    name: str = "kernel"
    fstype: str = "squashfs"

    def missing_tools(self) -> list[str]:
        return [] if os.path.exists(loop.LOOP_CONTROL) else [f"{loop.LOOP_CONTROL} (modprobe loop)"]

    def mounted(self, target: Path) -> str | None:
        return _mounted(target)

    async def mount(self, image: Path, target: Path) -> None:
        await _in_thread(loop.mount_image, image, target, time_limit=self.timeout,
                         error=MountFailed)

    def mount_file(self, image_fd: int, image: Path, target: Path) -> str:
        return loop.mount_file(image_fd, image, target)

    async def unmount(self, target: Path, *, lazy: bool = False) -> None:
        await _in_thread(functools.partial(loop.unmount, lazy=lazy), target,
                         time_limit=self.timeout, error=UnmountFailed)


async def _in_thread(
    fn: Callable[..., object], *args: Any, time_limit: float, error: type[MountError]
) -> None:
    """Run a blocking mount call in a worker thread. A call that does not return in time is
    abandoned (a thread cannot be killed) and reported as an error."""
    try:
        with trio.fail_after(time_limit):
            await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise error(f"{getattr(fn, '__name__', 'mount')} gave no answer in {time_limit:g} s; "
                    "abandoned") from None
    except OSError as exc:
        raise error(str(exc)) from exc


@dataclass
class SquashfuseBackend:
    """squashfuse_ll (or squashfuse) in user space: works without root."""

    timeout: float = 30.0
    name: str = "squashfuse"
    fstype: str = "fuse.squashfuse_ll"

    def __post_init__(self) -> None:
        self.program = "squashfuse_ll" if shutil.which("squashfuse_ll") else "squashfuse"
        self.fstype = f"fuse.{self.program}"

    def missing_tools(self) -> list[str]:
        return _missing(self.program, "fusermount3")

    def mounted(self, target: Path) -> str | None:
        return _mounted(target)

    async def mount(self, image: Path, target: Path) -> None:
        await run_tool([self.program, "-o", MOUNT_OPTIONS, str(image), str(target)],
                       self.timeout)

    async def unmount(self, target: Path, *, lazy: bool = False) -> None:
        flags = ["-u", "-z"] if lazy else ["-u"]
        await run_tool(["fusermount3", *flags, str(target)], self.timeout, UnmountFailed)


def make_backend(kind: str, timeout: float) -> MountBackend:
    """`auto` is the kernel when running as root (faster on metadata), else squashfuse."""
    if kind == "auto":
        kind = "kernel" if os.geteuid() == 0 else "squashfuse"
    if kind == "kernel":
        return KernelBackend(timeout)
    if kind == "squashfuse":
        return SquashfuseBackend(timeout)
    raise ValueError(f"unknown backend {kind!r} (expected auto, kernel or squashfuse)")
