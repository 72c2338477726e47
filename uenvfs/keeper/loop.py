"""The keeper's one loop over poll(2): the signals it gets, its servers' messages and exits,
the start of the next server, and systemd's watchdog. What each of those does is the
Keeper's (keeper/keeper.py). The standard library only."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time

from . import servers, systemd
from .keeper import Keeper
from .servers import Child

log = logging.getLogger("uenvfs.keeper")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class Watchdog:
    """systemd's watchdog (WatchdogSec=): tell it that the keeper runs, and kill a serving
    server that has said nothing for that long (its loop hangs: a new server then resumes the
    connection, as after a crash).

    Invariant: systemd hears WATCHDOG=1 at least every `seconds / 4` while `check` is called
    when it says.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.pinged = 0.0  # when we last told systemd WATCHDOG=1

    def check(self, server: Child | None) -> int:
        """Look at the *server*, and tell systemd; returns the milliseconds until the next
        look."""
        now = time.monotonic()
        if server is not None and server.serving and now - server.heard > self.seconds:
            log.error("server pid %d said nothing for %.1f s (WatchdogSec=%g): killing it; a "
                      "new one resumes the connection", server.pid, now - server.heard,
                      self.seconds)
            server.heard = now  # once: its exit comes through its pidfd
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGKILL)
        if now - self.pinged >= self.seconds / 4:
            self.pinged = now
            systemd.notify("WATCHDOG=1")
        return max(1, int((self.pinged + self.seconds / 4 - now) * 1000))


def run(keeper: Keeper) -> int:
    """Keep a server running until it stops on purpose; returns its exit status."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for handled in SIGNALS:
        signal.signal(handled, lambda *_: None)
    watchdog = Watchdog(keeper.watchdog) if keeper.watchdog else None
    keeper.start()
    while True:
        timeout = keeper.next_start()
        children = keeper.children()
        poll = select.poll()
        poll.register(wake_r, select.POLLIN)
        for child in children:
            poll.register(child.pidfd, select.POLLIN)
            if child.sock.fileno() >= 0:
                poll.register(child.sock.fileno(), select.POLLIN)
        if watchdog is not None:
            timeout = min(timeout if timeout is not None else 1 << 30,
                          watchdog.check(keeper.current))
        try:
            events = dict(poll.poll(timeout))
        except InterruptedError:
            continue
        if wake_r in events:
            for signum in os.read(wake_r, 64):
                keeper.signalled(signum)
        for child in children:
            if child.sock.fileno() in events and child.pidfd not in events:
                try:
                    if not keeper.receive(child):
                        child.sock.close()
                except OSError as exc:
                    log.warning("reading from server pid %d: %s", child.pid, exc)
        for child in children:
            if child.pidfd in events:
                code = keeper.exited(child)
                if code is not None:
                    return code
        servers.reap_strays({c.pid for c in keeper.children()})
