"""How a keeper starts: `uenvfs serve` (the keeper of a new connection, or of one systemd
kept), or a keeper for a running server (`python -m uenvfs.keeper`: its keeper died, or
`restart` runs the installed keeper code). The standard library only."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys

from ..kernel import fusedev
from . import loop, systemd
from .keeper import Keeper
from .protocol import ENV_SERVER, FUSE, HELD, LEDGER, SOCKET, server_argv, uenvfs_args

log = logging.getLogger("uenvfs.keeper")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def kernel_refusal(code: int, release: str) -> str:
    """The one line `serve` refuses to start with when pidfd_open failed with *code* on the
    kernel *release*."""
    if code == errno.ENOSYS:
        return f"uenvfs needs Linux 5.3 or later (pidfd_open); this kernel is {release}"
    return (f"uenvfs needs pidfd_open (Linux 5.3 or later), which fails here: "
            f"{os.strerror(code)} (kernel {release}; a seccomp filter?)")


def check_kernel() -> str | None:
    """Why uenvfs cannot run on this kernel, in one line; None if it can. The keeper watches
    its servers through pidfds: probe pidfd_open (Linux 5.3) on our own pid."""
    if not hasattr(os, "pidfd_open"):
        return "uenvfs needs os.pidfd_open (Linux 5.3); this Python was built without it"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        return kernel_refusal(exc.errno or errno.ENOSYS, os.uname().release)
    return None


def serve() -> int:
    """`uenvfs serve`: the keeper of a new connection, or of one systemd kept."""
    refusal = check_kernel()
    if refusal is not None:
        print(f"uenvfs serve: {refusal}", file=sys.stderr)
        return 1
    held = systemd.stored_fds()
    if held and (FUSE not in held or LEDGER not in held or not fusedev.alive(held[FUSE])):
        log.warning("systemd's store holds no live FUSE connection of uenvfs; mounting anew")
        for fd in held.values():
            os.close(fd)
        held = {}
    return loop.run(Keeper(server_argv(), held))


def adopt_server() -> int:
    """A keeper for a running server (its keeper died, or `restart` ran the installed keeper
    code): hold the server's descriptors and watch it."""
    info = json.loads(os.environ.pop(ENV_SERVER))
    held = {name: fd for name, fd in zip(HELD, info["fds"], strict=True) if fd >= 0}
    if info.get("socket", -1) >= 0:  # absent: a server of the version before
        held[SOCKET] = info["socket"]
    for fd in [*held.values(), info["sock"]]:
        os.set_inheritable(fd, False)
    sock = socket.socket(fileno=info["sock"])
    try:
        # The installed code's command, whatever the server's was (e.g. without -P).
        keeper = Keeper(server_argv(uenvfs_args(info["argv"])), held, info["pid"], sock)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return 1  # the server is gone already
        raise
    keeper.ready_told = True
    if info.get("restart"):
        keeper.restart_first = True
    return loop.run(keeper)
