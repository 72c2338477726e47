"""The server's side of the keeper (see keeper/keeper.py, and keeper/protocol.py for what they
say): tell it what it must know, and replace it if it dies."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Sequence

import trio

from ..keeper.protocol import (
    ENV_FDSTORE,
    ENV_SERVER,
    GO,
    HANDOVER,
    HOLD,
    HOLD_SOCKET,
    MAX_MESSAGE,
    READY,
    RESTART,
    RESTART_FAILED,
    STANDBY,
    keeper_argv,
    parse,
    server_argv,
    socketpair,
)

log = logging.getLogger(__name__)


class Link:
    """The socket to this server's keeper, and the descriptors the keeper must hold."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.held: list[int] = []  # fuse, ledger, lock: what a new keeper gets
        self.socket = -1  # the query socket's listening descriptor, for a new keeper too
        self._children: list[subprocess.Popen[bytes]] = []

    def send(self, word: str, fds: Sequence[int] = ()) -> None:
        try:
            socket.send_fds(self.sock, [word.encode()], list(fds))
        except OSError as exc:
            log.warning("cannot tell the keeper %r: %s", word, exc.strerror)

    def hold(self, fuse: int, ledger: int, lock: int) -> None:
        """Have the keeper hold the connection (a new one, mounted by this server)."""
        self.held = [fuse, ledger, lock]
        self.send(HOLD, self.held)

    def resumed_with(self, fuse: int, ledger: int, lock: int) -> None:
        """The keeper handed us these (it holds them already)."""
        self.held = [fuse, ledger, lock]

    def hold_socket(self, fd: int, made: bool) -> None:
        """Have the keeper hold the query socket too, if this server *made* it (else the
        keeper handed it over, and holds it already)."""
        self.socket = fd
        if made:
            self.send(HOLD_SOCKET, [fd])

    def ready(self) -> None:
        self.send(READY)

    def request_restart(self) -> None:
        """Have the keeper start a new server, which takes over once it is ready."""
        self.send(RESTART)

    async def wait_go(self) -> int | None:
        """A new server started by `restart`: say we are ready to take over, and wait until
        the old server has stopped. Returns the state it handed over (a memfd), or None if
        it died instead."""
        self.send(STANDBY)
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 4)
            except BlockingIOError:
                continue
            if not data:
                raise OSError(errno.EPIPE, "the keeper is gone")
            if parse(data)[0] == GO:
                return fds[0] if fds else None
            for fd in fds:
                os.close(fd)

    async def watch(self, on_handover: Callable[[], None],
                    on_restart_failed: Callable[[str], None]) -> None:
        """Until cancelled: when the keeper dies, start another that holds our descriptors.
        When it asks us to hand over to a new server, call *on_handover*; when the new server
        of a restart died instead, *on_restart_failed* with why."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            word, text = parse(data)
            if word == HANDOVER:
                on_handover()
                continue
            if word == RESTART_FAILED:
                on_restart_failed(text)
                continue
            if data:
                log.debug("keeper says %r", data)
                continue
            for child in self._children:
                child.poll()  # reap a keeper we started that died
            if not self.held:
                log.error("the keeper is gone before holding the connection")
                await trio.sleep_forever()
            if os.environ.get(ENV_FDSTORE):
                # Under systemd: its store holds the connection, and it starts the service
                # again, whose keeper starts a server; this one must not serve beside it.
                log.error("the keeper died: systemd holds the FUSE connection and starts "
                          "uenvfs again; exiting")
                os._exit(1)
            log.error("the keeper died: starting another to hold the FUSE connection")
            self._replace()

    def _replace(self) -> None:
        ours, theirs = socketpair()
        env = dict(os.environ)
        env[ENV_SERVER] = json.dumps({"pid": os.getpid(), "fds": self.held,
                                      "socket": self.socket, "sock": theirs.fileno(),
                                      "argv": server_argv()})
        self._children.append(subprocess.Popen(
            keeper_argv(), env=env,
            pass_fds=[theirs.fileno(), *(fd for fd in [*self.held, self.socket] if fd >= 0)],
            stdin=subprocess.DEVNULL))
        theirs.close()
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        ours.setblocking(False)
        self.sock = ours
