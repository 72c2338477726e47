"""One daemon per state directory and per mountpoint.

A second `uenvfs serve` must not take over what a live one serves: it would lazily unmount the
live daemon's FUSE mount, and each would unmount backing mounts the other is serving. So the
daemon holds a lock on its state directory for its whole life, and a FUSE mount found on the
mountpoint is cleared only when its connection is dead (its daemon was killed).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

import trio

from ..core.config import Config
from ..core.errors import MountError, StartupError
from ..kernel import mountinfo
from ..manager.backend import run_tool

log = logging.getLogger(__name__)

LOCK_NAME = "lock"
PROBE_SECONDS = 2.0  # how long a live FUSE daemon may take to answer statfs at start-up


def lock_state_dir(state_dir: Path, pid: int) -> int:
    """Lock *state_dir* for the uenvfs whose keeper is *pid* (released when the last process
    holding the returned fd exits: the keeper holds it too); returns the lock's fd.

    Raises `StartupError` naming the holder's pid if another daemon holds it.
    """
    path = state_dir / LOCK_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StartupError(f"cannot create the lock {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise StartupError(f"another uenvfs (pid {holder}) uses the state directory "
                               f"{state_dir}; stop it first") from None
        raise StartupError(f"cannot lock {path}: {exc.strerror}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)
    return fd


def _probe(mountpoint: Path) -> None:
    os.statvfs(mountpoint)


async def connection_alive(mountpoint: Path, patience: float = PROBE_SECONDS) -> bool | None:
    """Whether the FUSE filesystem at *mountpoint* has a daemon that answers.

    True: it answered (an error is an answer too); False: its connection is gone (ENOTCONN,
    ECONNABORTED); None: no answer within *patience* seconds (a hung daemon, or one under
    heavy load). Never call this on the daemon's own live mount: it would wait for itself.
    """
    with trio.move_on_after(patience):
        try:
            await trio.to_thread.run_sync(_probe, mountpoint, abandon_on_cancel=True)
        except OSError as exc:
            return exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED)
        return True
    return None


async def clear_stale_mount(config: Config) -> None:
    """A killed daemon leaves its FUSE mount behind ("Transport endpoint is not connected"):
    clear it. A live one is left alone, and this daemon refuses to start."""
    entry = mountinfo.mount_at(config.mountpoint)
    if entry is None:
        return
    if not entry.fstype.startswith("fuse"):
        raise StartupError(f"{config.mountpoint} already has a {entry.fstype} mount on it")
    alive = await connection_alive(config.mountpoint)
    if alive:
        raise StartupError(f"another FUSE daemon ({entry.source}) serves {config.mountpoint}; "
                           "stop it first")
    if alive is None:
        raise StartupError(f"the FUSE mount at {config.mountpoint} ({entry.source}) gives no "
                           f"answer within {PROBE_SECONDS:g} s; if its daemon is dead or hung, "
                           f"clear it with: umount -l {config.mountpoint}")
    log.warning("clearing a FUSE mount left at %s by an earlier daemon (%s)",
                config.mountpoint, entry.source)
    try:
        await run_tool(["umount", "-l", str(config.mountpoint)], config.mount_timeout)
    except MountError as exc:
        raise StartupError(f"cannot clear the stale mount at {config.mountpoint}: {exc}") from exc
