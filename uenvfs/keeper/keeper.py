"""The keeper: holds the FUSE connection, and keeps a server answering it.

`uenvfs serve` runs as the keeper. It starts the server (the same command, with
UENVFS_KEEPER set in its environment), which mounts the filesystem and hands the keeper the
connection's descriptors: /dev/fuse, the ledger (core/ledger.py) and the state directory's
lock. From then on both hold them, so the connection outlives either process:

  - the server dies (a bug, kill -9, the OOM killer): the keeper starts a new one at once,
    which resumes the connection (kernel/fusedev.py); requests wait in the kernel meanwhile;
  - the keeper dies: the server starts a new keeper and hands it the descriptors (under
    systemd the server exits instead, and systemd starts uenvfs again from its store);
  - `uenvfs restart` (`.control` `restart`): the keeper runs the installed keeper code (exec,
    same pid), which starts a new server from the installed code; it takes over from the old
    one once it is ready (see server/handover.py);
  - under systemd, the keeper also keeps the descriptors in systemd's store (FDSTORE=1), and
    takes them back from LISTEN_FDS when it starts, so that even the death of every uenvfs
    process does not end the connection.

The keeper also holds the query socket's listening descriptor (server/queries.py), which a
server makes and hands over ("hold-socket") and every later server gets: clients that ask
while no server runs wait in its backlog for the next one.

The connection ends when the server stops on purpose (SIGTERM to the keeper, `systemctl stop`,
an unmount from outside): it says so ("stopping"), unmounts, and the keeper exits with its
exit status.
Signals the keeper gets (TERM, INT, HUP, USR1) go to the server.

Small on purpose: the standard library only, one loop over poll(2), no state but the
descriptors and its servers (the current one, and a new one during a restart). The keeper/
modules: protocol.py (what a keeper and a server say to each other: words, one per datagram,
descriptors with "hold" and "handed"), keeper.py (this: what the keeper does about its
servers), servers.py (starting and reaping one), loop.py (the poll loop, signals, the
watchdog), systemd.py (sd_notify, the descriptor store), serve.py (how a keeper starts).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time

from ..kernel import fusedev
from . import servers, systemd
from .protocol import (
    ENV_LOG_LEVEL,
    ENV_SERVER,
    FUSE,
    GO,
    HANDED,
    HANDOVER,
    HELD,
    HOLD,
    HOLD_SOCKET,
    MAX_MESSAGE,
    READY,
    RESTART,
    RESTART_FAILED,
    SOCKET,
    STANDBY,
    STATUS,
    STOPPING,
    keeper_argv,
    parse,
)
from .servers import Child

log = logging.getLogger("uenvfs.keeper")

# A server that dies before it serves is started again after these pauses (one more each
# time in a row): a server that cannot start must not take the node's CPU meanwhile.
BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)


class Keeper:
    """Holds the connection's descriptors and runs its server; see the module's docstring.
    keeper/loop.py drives it: `start`, then `receive`, `exited`, `signalled` and
    `next_start` as poll(2) says.

    Invariants: `current` is the server that answers the connection, None while none does
    (after one died, until the next is started or, during a restart, takes over); `next` is
    a server started by `restart` that has not taken over yet; `held` has the connection's
    descriptors (from systemd's store, an adopted server or the first "hold") until the
    connection ends (`_release`), and the query socket's once a server handed it over.
    """

    def __init__(self, server_argv: list[str], held: dict[str, int] | None = None,
                 server_pid: int | None = None, sock: socket.socket | None = None) -> None:
        self.server_argv = server_argv
        self.held = dict(held or {})  # fuse, ledger, lock
        self.current: Child | None = None
        if server_pid is not None and sock is not None:
            self.current = Child(server_pid, os.pidfd_open(server_pid), sock, serving=True)
        self.next: Child | None = None  # started by `restart`
        self.retired: list[Child] = []  # old servers that handed over, until they exit
        self.stopping = False  # the server stops on purpose
        self.stop_asked = False  # we were told to stop (and told the server)
        self.failed_starts = 0  # servers in a row that died before serving
        self.start_at: float | None = None  # when to start the next server
        self.pending: list[int] = []  # signals for the next server
        self.ready_told = False
        self.restart_first = False  # a re-executed keeper: restart the server at once
        self.watchdog = systemd.watchdog_seconds()  # systemd's WatchdogSec=, if set
        self.died: str | None = None  # how the last server died (ENV_DIED), until one serves

    def children(self) -> list[Child]:
        """Every server process the keeper watches."""
        return [c for c in (self.current, self.next, *self.retired) if c is not None]

    # -- servers ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the first server (unless we adopted one), and the restart a re-executed
        keeper was asked for."""
        if self.current is None:
            self.current = self.start_server(resume=FUSE in self.held)
        if self.restart_first:
            self._restart()

    def start_server(self, resume: bool, standby: bool = False) -> Child:
        return servers.spawn(self.server_argv, self.held, resume, standby, self.watchdog,
                             None if standby else self.died)

    def next_start(self) -> int | None:
        """Start the next server if it is due; else the milliseconds until it is (None: no
        server waits to be started)."""
        if self.start_at is None:
            return None
        timeout = max(0, int((self.start_at - time.monotonic()) * 1000))
        if timeout:
            return timeout
        self.start_at = None
        self.current = self.start_server(resume=True)
        return None

    def receive(self, child: Child) -> bool:
        """Handle one message from *child*; False at the end of its stream."""
        data, fds, _, _ = socket.recv_fds(child.sock, MAX_MESSAGE, 8)
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        child.heard = time.monotonic()
        word, rest = parse(data)
        if word == HOLD:
            self._hold(dict(zip(HELD, fds, strict=False)))
        elif word == HOLD_SOCKET and fds:
            self._hold({SOCKET: fds[0]})
            for fd in fds[1:]:
                os.close(fd)
        elif word == HANDED and fds:
            child.handed = fds[0]
            for fd in fds[1:]:
                os.close(fd)
            self._take_over()
        else:
            for fd in fds:
                os.close(fd)
        if word == READY:
            self._ready(child)
        elif word == STOPPING:
            self.stopping = True
            systemd.notify("STOPPING=1")
        elif word == STATUS and rest != child.status and child is self.current:
            child.status = rest
            systemd.notify(f"STATUS={rest}")
        elif word == RESTART:
            self._reexec()
            self._restart()
        elif word == STANDBY and child is self.next:
            child.standby = True
            if self.current is None:
                self._take_over()
            else:
                servers.send(self.current, HANDOVER)
        return True

    def _ready(self, child: Child) -> None:
        child.serving = True
        self.failed_starts = 0
        self.died = None
        if not self.ready_told:
            self.ready_told = True
            systemd.notify("READY=1")
        for signum in self.pending:
            self._forward(signum)
        self.pending.clear()

    def _hold(self, fds: dict[str, int]) -> None:
        """Hold *fds* from now on: the connection (HELD's names, replacing all of them), or
        the query socket (SOCKET, replacing the one held)."""
        replaced = HELD if FUSE in fds else tuple(fds)
        for name in replaced:
            fd = self.held.pop(name, None)
            if fd is not None:
                os.close(fd)
        self.held.update(fds)
        systemd.store(fds)
        log.info("holding the %s (fds %s)",
                 "FUSE connection" if FUSE in fds else "query socket", fds)

    def _reexec(self) -> None:
        """Become the installed keeper (same pid: systemd's main process stays), holding what
        this one holds, then restart the server. If that cannot run, the server replaces us
        (or systemd restarts uenvfs): the connection is held by the server meanwhile."""
        current = self.current
        if current is None or self.next is not None or FUSE not in self.held:
            return
        fds = [self.held.get(name, -1) for name in HELD]
        socket_fd = self.held.get(SOCKET, -1)
        info = {"pid": current.pid, "fds": fds, "socket": socket_fd,
                "sock": current.sock.fileno(), "argv": self.server_argv, "restart": True}
        for fd in [*fds, socket_fd, current.sock.fileno()]:
            if fd >= 0:
                os.set_inheritable(fd, True)
        env = {**os.environ, ENV_SERVER: json.dumps(info),
               ENV_LOG_LEVEL: logging.getLevelName(logging.getLogger().level)}
        log.info("restart: the keeper runs the installed code first (pid %d stays)", os.getpid())
        argv = keeper_argv()
        try:
            os.execve(argv[0], argv, env)
        except OSError as exc:
            log.error("cannot run the installed keeper (%s); restarting the server only", exc)

    def _restart(self) -> None:
        """Start a new server from the installed code; it takes over once it is ready."""
        if self.next is not None:
            log.info("a restart is under way already (new server pid %d)", self.next.pid)
            return
        if FUSE not in self.held or self.stopping:
            return
        self.next = self.start_server(resume=True, standby=True)

    def _take_over(self) -> None:
        """The new server goes on from here: with the state the old one handed over, or (it
        died) with none, as after a crash."""
        new = self.next
        if new is None or not new.standby:
            return  # not ready yet: it takes over when it says so
        old = self.current
        handed = old.handed if old is not None else None
        if old is not None and handed is None:
            return  # the old server serves until it hands over (or dies)
        servers.send(new, GO, [handed] if handed is not None else [])
        if handed is not None:
            os.close(handed)
            if old is not None:
                old.handed = -1  # handed over: its exit is no crash
        self.current, self.next = new, None
        log.info("server pid %d takes over the connection%s", new.pid,
                 "" if handed is not None else " (the old server died: as after a crash)")
        if old is not None:
            self.retired.append(old)

    def signalled(self, signum: int) -> None:
        """The keeper got *signum*: it goes to the server (to the next one if none runs)."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_asked = True
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        if self.current is None:
            self.pending.append(signum)
            return
        try:
            os.kill(self.current.pid, signum)
        except ProcessLookupError:
            self.pending.append(signum)

    # -- exits --------------------------------------------------------------------------

    def exited(self, child: Child) -> int | None:
        """*child* is gone: the exit status to exit with, or None to go on."""
        status = self._gone(child)
        if child in self.retired:
            self.retired.remove(child)
            return None
        if child is self.next:
            self.next = None
            how = "exited" if status is None else f"exited with status {status}"
            why = f"the new server (pid {child.pid}) {how} before it took over (its log says why)"
            log.error("restart failed: %s; the old server goes on serving", why)
            if self.current is not None:
                servers.send(self.current, f"{RESTART_FAILED} {why}")
            if self.current is None:
                return self._after_server(status, served=False)
            return None
        self.current = None
        if self.next is not None:
            # The old server died during a restart: the new one resumes, as after a crash,
            # now or once it is ready.
            self._take_over()
            return None
        code = self._after_server(status, child.serving)
        if code is None:
            self.died = self._death(child, status)
        return code

    def _gone(self, child: Child) -> int | None:
        """*child* exited: reap it (if it is ours) and read what it said last. Returns its
        exit status if known."""
        status = servers.reap(child)
        if child.sock.fileno() >= 0:  # else: closed at its end of stream already
            child.sock.setblocking(False)
            with contextlib.suppress(OSError):
                while self.receive(child):
                    pass
            child.sock.close()
        if status is not None and status < 0:
            log.error("server pid %d was killed by %s", child.pid, signal.Signals(-status).name)
        elif (not self.stopping and child.handed is None and FUSE in self.held
              and child is not self.next):  # a new server that failed: `exited` says so
            log.error("server pid %d exited (%s) without stopping", child.pid,
                      "status unknown: not our child" if status is None else f"status {status}")
        return status

    def _death(self, child: Child, status: int | None) -> str:
        """How *child* died, for the next server (ENV_DIED): killed by the OOM killer if it
        died of SIGKILL while the memory cgroup's OOM kills went up."""
        before, now = child.oom_kills, servers.oom_kills()
        oom = (status == -signal.SIGKILL and before is not None and now is not None
               and now > before)
        if oom:
            log.error("server pid %d was killed by the OOM killer (its memory cgroup counts "
                      "%d OOM kills, %d when it started)", child.pid, now, before)
        return json.dumps({"status": status, "oom": oom, "before_serving": self.failed_starts})

    def _after_server(self, status: int | None, served: bool) -> int | None:
        """The server is gone: the exit status to exit with, or None after starting another."""
        fuse = self.held.get(FUSE)
        if self.stopping or fuse is None or not fusedev.alive(fuse):
            # On purpose, before it handed us a connection, or the connection ended anyway.
            self._release()
            return 0 if status is None else (status if status >= 0 else 128 - status)
        if self.stop_asked:
            self.pending.append(signal.SIGTERM)  # it died before it stopped: the next one
        if not served:
            self.failed_starts += 1
        pause = BACKOFF[min(self.failed_starts, len(BACKOFF)) - 1] if self.failed_starts else 0
        if pause:
            log.error("%d servers in a row died before serving; next try in %g s (the "
                      "connection waits)", self.failed_starts, pause)
        self.start_at = time.monotonic() + pause
        return None

    def _release(self) -> None:
        if self.held:
            systemd.unstore()
        for fd in self.held.values():
            os.close(fd)
        self.held = {}
