"""The FUSE connection itself: mounting it, and resuming it in a new process.

A FUSE connection lives as long as some process holds its /dev/fuse descriptor, whether or not
a process reads requests from it: requests wait in the kernel's queue. uenvfs keeps it alive
across a crash or a restart of the process that serves it (see keeper/keeper.py), and a new
server resumes it:

  - libfuse answers every request before INIT with an error, and the kernel sends INIT once per
    connection. So a new server gives libfuse the connection's INIT request again, from a pipe:
    libfuse is started on the pipe's read end (pyfuse3 takes `/dev/fd/N` as its mount point
    and then mounts nothing), reads the INIT there, and while it handles it (in
    `Operations.init`) `switch_to` puts the live connection in the pipe's place (dup2). The
    reply to that INIT reaches the kernel, which answers ENOENT (the connection was initialized
    long ago), which libfuse ignores; for a new connection it is the real reply.
  - `resend` (FUSE_NOTIFY_RESEND, Linux 6.9) puts back in the queue every request that a dead
    server had read but not answered, so that the new one answers it.

Only the standard library: the keeper imports this too.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
from pathlib import Path

from . import libc, mountinfo

log = logging.getLogger(__name__)

DEVICE = "/dev/fuse"
FSNAME = "uenvfs"
FSTYPE = "fuse.uenvfs"
FUSE_INIT = 26
NOTIFY_RESEND = 7  # enum fuse_notify_code
IN_HEADER = struct.Struct("=IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, padding
OUT_HEADER = struct.Struct("=IiQ")  # len, error (or notify code), unique (0: a notification)
READ_BUFFER = (1 << 20) + 4096  # more than the kernel's minimum for a read of /dev/fuse


class FuseDevError(OSError):
    """Mounting, reading or resuming the connection failed; the message names the step."""


def mount(mountpoint: Path) -> tuple[int, bytes]:
    """Mount a new uenvfs connection at *mountpoint*: its /dev/fuse fd and its INIT request.

    The options are those libfuse would use for uenvfs: allow_other, default_permissions (the
    kernel checks the modes), nosuid and nodev. The kernel queues its INIT at once; it is read
    here, to be handed to libfuse (and to every later server) through `init_pipe`.
    """
    fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        data = (f"fd={fd},rootmode=40000,user_id=0,group_id=0,"
                "default_permissions,allow_other").encode()
        try:
            libc.mount(FSNAME.encode(), os.fsencode(mountpoint), FSTYPE.encode(),
                       libc.MS_NOSUID | libc.MS_NODEV, data)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise FuseDevError(code, f"mount of FUSE at {mountpoint}: {os.strerror(code)}"
                               ) from exc
        try:
            init = os.read(fd, READ_BUFFER)
        except OSError as exc:
            unmount(mountpoint)
            raise FuseDevError(exc.errno, f"reading FUSE's INIT: {exc.strerror}") from exc
        if len(init) < IN_HEADER.size or IN_HEADER.unpack_from(init)[1] != FUSE_INIT:
            unmount(mountpoint)
            raise FuseDevError(errno.EPROTO, "the kernel's first FUSE request is not INIT")
    except BaseException:
        os.close(fd)
        raise
    return fd, init


def unmount(mountpoint: Path) -> None:
    """Detach the FUSE mount at *mountpoint* (lazily: jobs inside it see it go away)."""
    try:
        libc.umount2(os.fsencode(mountpoint), libc.MNT_DETACH)
    except OSError as exc:
        code = exc.errno or errno.EIO
        if code not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise FuseDevError(code, f"umount {mountpoint}: {os.strerror(code)}") from exc


def init_pipe(init: bytes) -> int:
    """A pipe holding *init*; returns its read end, for libfuse to start on (`/dev/fd/N`)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(write_end, init)
    finally:
        os.close(write_end)
    return read_end


def switch_to(live: int, pipe_fd: int) -> None:
    """Put the connection *live* in the place of libfuse's pipe *pipe_fd* (same number)."""
    os.dup2(live, pipe_fd, inheritable=False)


def resend(fd: int) -> bool:
    """Have the kernel queue again every request read but not answered on this connection.
    False if the kernel cannot (before 6.9): such requests then wait forever."""
    try:
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True


def alive(fd: int) -> bool:
    """Whether the connection *fd* still lives (it ends with its unmount or an abort)."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return not any(event & (select.POLLERR | select.POLLHUP) for _, event in poll.poll(0))


def set_read_ahead(mountpoint: Path, kb: int) -> None:
    """Let the kernel read ahead *kb* KiB through the FUSE mount at *mountpoint* (its default
    is 128 KiB).

    Each FUSE read costs a round trip and two copies: with 1 MiB windows a cold 1 GiB file
    takes 1,024 reads instead of 8,192 (measured 3.3 s -> 2.0 s here, the kernel's own squashfs
    mount 1.0 s). Found through mountinfo: the daemon must not stat its own mountpoint.
    """
    entry = mountinfo.mount_at(mountpoint)
    if entry is None:
        return
    knob = Path("/sys/class/bdi") / entry.major_minor / "read_ahead_kb"
    try:
        knob.write_text(str(kb))
    except OSError as exc:
        log.warning("cannot set %s: %s", knob, exc.strerror)
