"""What the keeper tells systemd and takes from it: sd_notify(3) messages (READY=1, STATUS=,
WATCHDOG=1, the descriptor store), WatchdogSec=, and the descriptors systemd gives back from
its store when uenvfs starts again. Nothing of it happens without systemd (no NOTIFY_SOCKET,
no LISTEN_FDS). The standard library only."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence

from .protocol import STORED

log = logging.getLogger("uenvfs.keeper")


def notify(message: str, fds: Sequence[int] = ()) -> None:
    """Send *message* (and *fds*) to systemd's notification socket, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            socket.send_fds(sock, [message.encode()], list(fds))
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)


def store(fds: dict[str, int]) -> None:
    """Have systemd keep those of *fds* (by name) that belong in its store."""
    for name, fd in fds.items():
        if name in STORED:
            notify(f"FDSTORE=1\nFDNAME={name}", [fd])


def unstore() -> None:
    """Have systemd close what it keeps of ours: the connection ends."""
    for name in STORED:
        notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def watchdog_seconds() -> float:
    """systemd's WatchdogSec= for this process, in seconds (0: none); taken from the
    environment, so that no server sees it."""
    usec = os.environ.pop("WATCHDOG_USEC", "")
    pid = os.environ.pop("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6


def stored_fds() -> dict[str, int]:
    """The descriptors systemd gave back from its store (LISTEN_FDS), by name."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    found = {}
    for index in range(count):
        fd = 3 + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) else ""
        if name in STORED and name not in found:
            found[name] = fd
        else:
            os.close(fd)
    return found
