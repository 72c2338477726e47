"""What the keeper and its servers say to each other, and how they start each other; both
sides import this (the server in server/link.py and server/daemon.py). The standard library
only.

A keeper and a server talk over a socket pair (`socketpair`), one message per datagram: a word,
for some a space and a text, for some descriptors with it.

From a server to its keeper:

    hold      + fuse, ledger, lock   a new connection, mounted by this server: hold it too
    hold-socket + socket             the query socket this server listens on (one it made,
                                     not got from the keeper): hold it too
    ready                            it serves (libfuse went through INIT)
    status TEXT                      how it serves, every HEARTBEAT seconds at most: systemd's
                                     STATUS=, and the proof that its loop runs (the watchdog)
    stopping                         it stops on purpose: the connection ends with it
    restart                          `.control` `restart`: start a new server from the
                                     installed code (the keeper runs that code first)
    standby                          (a new server started by `restart`) ready to take over
    handed    + a memfd              (the old server) what only its memory held; it exits

From the keeper to a server:

    handover                         (the old server) the new one is ready: finish the
                                     requests under way, then hand over
    go        [+ a memfd]            (the new server) take over, with what the old one handed
                                     (none: it died, carry on as after a crash)
    restart-failed TEXT              the new server died before it took over; TEXT says how
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence

# -- the words -------------------------------------------------------------------------------

HOLD = "hold"
HOLD_SOCKET = "hold-socket"
READY = "ready"
STATUS = "status"
STOPPING = "stopping"
RESTART = "restart"
STANDBY = "standby"
HANDED = "handed"
HANDOVER = "handover"
GO = "go"
RESTART_FAILED = "restart-failed"

MAX_MESSAGE = 4096  # bytes of one message, at most

# -- the descriptors -------------------------------------------------------------------------

FUSE, LEDGER, LOCK, SOCKET = "fuse", "ledger", "lock", "socket"
HELD = (FUSE, LEDGER, LOCK)  # the connection, in the order of `hold` and ENV_RESUME
# The keeper also holds SOCKET, the query socket's listening descriptor (server/queries.py),
# apart from HELD: a server or keeper of the version before it, which splits HELD's lists
# into exactly three, works on with one that has it (and makes its own socket).
STORED = (FUSE, LEDGER, SOCKET)  # what it also keeps in systemd's store, by these names

# -- the environment -------------------------------------------------------------------------

ENV_KEEPER = "UENVFS_KEEPER"  # in a server: its socket to the keeper
ENV_RESUME = "UENVFS_RESUME"  # in a server: fuse,ledger,lock descriptors to resume with
ENV_SOCKET = "UENVFS_SOCKET"  # in a server: the query socket's descriptor, to listen on
# In a keeper started by a server whose keeper died, or run by `restart` (exec): a JSON object
# with the server's pid, the held descriptors ("fds", in HELD's order, -1 for none), the
# query socket ("socket", if held), the socket to the server ("sock"), its command ("argv"),
# and "restart" if it must start a new server.
ENV_SERVER = "UENVFS_SERVER"
ENV_STANDBY = "UENVFS_STANDBY"  # in a server started by `restart`: wait for GO
ENV_FDSTORE = "UENVFS_FDSTORE"  # in a server: systemd keeps the connection too (see Link)
ENV_HEARTBEAT = "UENVFS_HEARTBEAT"  # in a server: seconds between its STATUS messages
ENV_LOG_LEVEL = "UENVFS_LOG_LEVEL"  # in a keeper run by `restart`: the log level to keep
# In a server started after the last one died: a JSON object saying how it died ("status":
# its exit status, negative for a signal, null if unknown; "oom": whether the OOM killer
# killed it; "before_serving": how many servers in a row died before they served), so that
# it restores only what it can afford (see server/resume.py).
ENV_DIED = "UENVFS_DIED"

HEARTBEAT = 5.0  # seconds between a server's STATUS messages, at most


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A new socket pair between a keeper and a server (one message per datagram)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def parse(data: bytes) -> tuple[str, str]:
    """The word of a message, and the text after it ("" if none)."""
    word, _, text = data.decode(errors="replace").partition(" ")
    return word, text


# How uenvfs runs Python: `-P` puts no unsafe path (`-m`'s working directory) first on the
# import path, so that a `uenvfs.py` that anyone left in the directory `serve` was started
# from never runs as root. The installed code runs, or what root's own PYTHONPATH names
# (scripts/bench.py and scripts/hostile.py run another checkout by it).
PYTHON = (sys.executable, "-P")


def server_argv(args: Sequence[str] | None = None) -> list[str]:
    """The command that starts a server: `uenvfs` with *args*, by default this very
    `uenvfs serve` command's."""
    return [*PYTHON, "-m", "uenvfs", *(sys.argv[1:] if args is None else args)]


def uenvfs_args(argv: Sequence[str]) -> list[str]:
    """The arguments of `uenvfs` in a server command *argv* (`server_argv`'s, or an older
    uenvfs's: a keeper run by `restart` after an upgrade gets one)."""
    return list(argv[argv.index("uenvfs") + 1:])


def keeper_argv() -> list[str]:
    """The command that starts a keeper for a running server (see keeper/__main__.py)."""
    return [*PYTHON, "-m", "uenvfs.keeper"]
