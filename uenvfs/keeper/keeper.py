"""The keeper: holds the FUSE connection, and keeps a server answering it.

`uenvfs serve` runs as the keeper. It starts the server (the same command, with
UENVFS_KEEPER set in its environment), which mounts the filesystem and hands the keeper the
connection's descriptors: /dev/fuse, the ledger (ledger.py) and the state directory's lock.
From then on both hold them, so the connection outlives either process:

  - the server dies (a bug, kill -9, the OOM killer): the keeper starts a new one at once,
    which resumes the connection (fusedev.py); requests wait in the kernel meanwhile;
  - the keeper dies: the server starts a new keeper and hands it the descriptors (under
    systemd the server exits instead, and systemd starts uenvfs again from its store);
  - `uenvfs restart` (`.control` `restart`): the keeper runs the installed keeper code (exec,
    same pid), which starts a new server from the installed code; it takes over from the old
    one once it is ready (see handover.py);
  - under systemd, the keeper also keeps the descriptors in systemd's store (FDSTORE=1), and
    takes them back from LISTEN_FDS when it starts, so that even the death of every uenvfs
    process does not end the connection.

The connection ends when the server stops on purpose (SIGTERM to the keeper, `systemctl stop`,
an unmount from outside): it says so ("stopping"), unmounts, and the keeper exits with its
exit status.
Signals the keeper gets (TERM, INT, HUP, USR1) go to the server.

Small on purpose: the standard library only, one loop over poll(2), no state but the
descriptors and its servers (the current one, and a new one during a restart). Messages on
the socket pair with a server are words, one per datagram (SOCK_SEQPACKET), descriptors with
"hold" and "handed".
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..kernel import fusedev

log = logging.getLogger("uenvfs.keeper")

ENV_KEEPER = "UENVFS_KEEPER"  # in a server: its socket to the keeper
ENV_RESUME = "UENVFS_RESUME"  # in a server: fuse,ledger,lock descriptors to resume with
ENV_SERVER = "UENVFS_SERVER"  # in a keeper started by a server: pid, and the server's argv
ENV_STANDBY = "UENVFS_STANDBY"  # in a server started by `restart`: wait for "go"
ENV_FDSTORE = "UENVFS_FDSTORE"  # in a server: systemd keeps the connection too (see Link)
ENV_HEARTBEAT = "UENVFS_HEARTBEAT"  # in a server: seconds between its "status" messages
HEARTBEAT = 5.0  # seconds between a server's "status" messages, at most
FD_NAMES = ("fuse", "ledger")  # the names of the descriptors in systemd's store
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# A server that dies before it serves is started again after these pauses (one more each
# time in a row): a server that cannot start must not take the node's CPU meanwhile.
BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _sd_notify(message: str, fds: Sequence[int] = ()) -> None:
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
        if name in FD_NAMES and name not in found:
            found[name] = fd
        else:
            os.close(fd)
    return found


@dataclass(eq=False)
class Child:
    """A server process: the current one, or a new one getting ready to take over."""

    pid: int
    pidfd: int
    sock: socket.socket
    serving: bool = False  # it said "ready"
    standby: bool = False  # a new server that said it is ready to take over
    handed: int | None = None  # the state an old server handed over (a memfd)
    heard: float = 0.0  # when it last said something (time.monotonic())
    status: str = ""  # the last STATUS= it asked for


class Keeper:
    """Holds the connection's descriptors and runs its server; see the module's docstring."""

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
        self.watchdog = watchdog_seconds()  # systemd's WatchdogSec=, if set
        self.pinged = 0.0  # when we last told systemd WATCHDOG=1

    # -- servers ------------------------------------------------------------------------

    def start_server(self, resume: bool, standby: bool = False) -> Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env[ENV_KEEPER] = str(theirs.fileno())
        env.pop(ENV_SERVER, None)
        env.pop(ENV_STANDBY, None)
        env.pop(ENV_FDSTORE, None)
        if os.environ.get("NOTIFY_SOCKET"):
            env[ENV_FDSTORE] = "1"
        if standby:
            env[ENV_STANDBY] = "1"
        if self.watchdog:
            env[ENV_HEARTBEAT] = f"{min(HEARTBEAT, self.watchdog / 4):g}"
        pass_fds = [theirs.fileno()]
        if resume:
            fds = [self.held.get(n, -1) for n in ("fuse", "ledger", "lock")]
            env[ENV_RESUME] = ",".join(map(str, fds))
            pass_fds += [fd for fd in fds if fd >= 0]
        else:
            env.pop(ENV_RESUME, None)
        process = subprocess.Popen(self.server_argv, env=env, pass_fds=pass_fds)
        theirs.close()
        child = Child(process.pid, os.pidfd_open(process.pid), ours, heard=time.monotonic())
        log.info("started server pid %d%s", process.pid,
                 " to take over the connection" if standby else
                 " to resume the connection" if resume else "")
        return child

    def _gone(self, child: Child) -> int | None:
        """*child* exited: reap it (if it is ours) and read what it said last. Returns its
        exit status if known."""
        status = None
        try:
            _, raw = os.waitpid(child.pid, 0)
            status = os.waitstatus_to_exitcode(raw)
        except ChildProcessError:
            pass  # not our child (we replaced a keeper): its status is its parent's
        os.close(child.pidfd)
        if child.sock.fileno() >= 0:  # else: closed at its end of stream already
            child.sock.setblocking(False)
            with contextlib.suppress(OSError):
                while self._receive(child):
                    pass
            child.sock.close()
        if status is not None and status < 0:
            log.error("server pid %d was killed by %s", child.pid, signal.Signals(-status).name)
        elif (not self.stopping and child.handed is None and "fuse" in self.held
              and child is not self.next):  # a new server that failed: `_exited` says so
            log.error("server pid %d exited (%s) without stopping", child.pid,
                      "status unknown: not our child" if status is None else f"status {status}")
        return status

    def _receive(self, child: Child) -> bool:
        """Handle one message from *child*; False at the end of its stream."""
        data, fds, _, _ = socket.recv_fds(child.sock, 4096, 8)
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        child.heard = time.monotonic()
        word, _, rest = data.decode().partition(" ")
        if word == "hold":
            self._hold(dict(zip(("fuse", "ledger", "lock"), fds, strict=False)))
        elif word == "handed" and fds:
            child.handed = fds[0]
            for fd in fds[1:]:
                os.close(fd)
            self._take_over()
        else:
            for fd in fds:
                os.close(fd)
        if word == "ready":
            self._ready(child)
        elif word == "stopping":
            self.stopping = True
            _sd_notify("STOPPING=1")
        elif word == "status" and rest != child.status and child is self.current:
            child.status = rest
            _sd_notify(f"STATUS={rest}")
        elif word == "restart":
            self._reexec()
            self._restart()
        elif word == "standby" and child is self.next:
            child.standby = True
            if self.current is None:
                self._take_over()
            else:
                _send(self.current, "handover")
        return True

    def _ready(self, child: Child) -> None:
        child.serving = True
        self.failed_starts = 0
        if not self.ready_told:
            self.ready_told = True
            _sd_notify("READY=1")
        for signum in self.pending:
            self._forward(signum)
        self.pending.clear()

    def _hold(self, fds: dict[str, int]) -> None:
        for fd in self.held.values():
            os.close(fd)
        self.held = fds
        stored = {name: fd for name, fd in fds.items() if name in FD_NAMES}
        for name, fd in stored.items():
            _sd_notify(f"FDSTORE=1\nFDNAME={name}", [fd])
        log.info("holding the FUSE connection (fds %s)", fds)

    def _reexec(self) -> None:
        """Become the installed keeper (same pid: systemd's main process stays), holding what
        this one holds, then restart the server. If that cannot run, the server replaces us
        (or systemd restarts uenvfs): the connection is held by the server meanwhile."""
        current = self.current
        if current is None or self.next is not None or "fuse" not in self.held:
            return
        fds = [self.held.get(n, -1) for n in ("fuse", "ledger", "lock")]
        info = {"pid": current.pid, "fds": fds, "sock": current.sock.fileno(),
                "argv": self.server_argv, "restart": True}
        for fd in [*fds, current.sock.fileno()]:
            if fd >= 0:
                os.set_inheritable(fd, True)
        env = {**os.environ, ENV_SERVER: json.dumps(info),
               "UENVFS_LOG_LEVEL": logging.getLevelName(logging.getLogger().level)}
        log.info("restart: the keeper runs the installed code first (pid %d stays)", os.getpid())
        try:
            os.execve(sys.executable, [sys.executable, "-m", "uenvfs.keeper"], env)
        except OSError as exc:
            log.error("cannot run the installed keeper (%s); restarting the server only", exc)

    def _restart(self) -> None:
        """Start a new server from the installed code; it takes over once it is ready."""
        if self.next is not None:
            log.info("a restart is under way already (new server pid %d)", self.next.pid)
            return
        if "fuse" not in self.held or self.stopping:
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
        _send(new, "go", [handed] if handed is not None else [])
        if handed is not None:
            os.close(handed)
            if old is not None:
                old.handed = -1  # handed over: its exit is no crash
        self.current, self.next = new, None
        log.info("server pid %d takes over the connection%s", new.pid,
                 "" if handed is not None else " (the old server died: as after a crash)")
        if old is not None:
            self.retired.append(old)

    def _forward(self, signum: int) -> None:
        if self.current is None:
            self.pending.append(signum)
            return
        try:
            os.kill(self.current.pid, signum)
        except ProcessLookupError:
            self.pending.append(signum)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Keep a server running until it stops on purpose; returns its exit status."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for handled in SIGNALS:
            signal.signal(handled, lambda *_: None)
        if self.current is None:
            self.current = self.start_server(resume="fuse" in self.held)
        if self.restart_first:
            self._restart()
        while True:
            timeout = None
            if self.start_at is not None:
                timeout = max(0, int((self.start_at - time.monotonic()) * 1000))
                if timeout == 0:
                    self.start_at = None
                    self.current = self.start_server(resume=True)
                    continue
            children = [c for c in (self.current, self.next, *self.retired) if c is not None]
            poll = select.poll()
            poll.register(wake_r, select.POLLIN)
            for child in children:
                poll.register(child.pidfd, select.POLLIN)
                if child.sock.fileno() >= 0:
                    poll.register(child.sock.fileno(), select.POLLIN)
            if self.watchdog:
                timeout = min(timeout if timeout is not None else 1 << 30, self._watch())
            try:
                events = dict(poll.poll(timeout))
            except InterruptedError:
                continue
            if wake_r in events:
                for signum in os.read(wake_r, 64):
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        self.stop_asked = True
                    self._forward(signum)
            for child in children:
                if child.sock.fileno() in events and child.pidfd not in events:
                    try:
                        if not self._receive(child):
                            child.sock.close()
                    except OSError as exc:
                        log.warning("reading from server pid %d: %s", child.pid, exc)
            for child in children:
                if child.pidfd in events:
                    code = self._exited(child)
                    if code is not None:
                        return code
            self._reap_strays()

    def _watch(self) -> int:
        """systemd's watchdog (WatchdogSec=): tell it that the keeper runs, and kill a
        serving server that has said nothing for that long (its loop hangs: a new server
        then resumes the connection, as after a crash). Returns the milliseconds until the
        next look."""
        now = time.monotonic()
        child = self.current
        if child is not None and child.serving and now - child.heard > self.watchdog:
            log.error("server pid %d said nothing for %.1f s (WatchdogSec=%g): killing it; a "
                      "new one resumes the connection", child.pid, now - child.heard,
                      self.watchdog)
            child.heard = now  # once: its exit comes through its pidfd
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        if now - self.pinged >= self.watchdog / 4:
            self.pinged = now
            _sd_notify("WATCHDOG=1")
        return max(1, int((self.pinged + self.watchdog / 4 - now) * 1000))

    def _reap_strays(self) -> None:
        """Reap children we do not track: an old server that exited while this keeper was
        being executed again (it forgot them)."""
        tracked = {c.pid for c in (self.current, self.next, *self.retired) if c is not None}
        while True:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if found is None or found.si_pid in tracked:
                return
            os.waitpid(found.si_pid, 0)

    def _exited(self, child: Child) -> int | None:
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
                _send(self.current, f"restart-failed {why}")
            if self.current is None:
                return self._after_server(status, served=False)
            return None
        self.current = None
        if self.next is not None:
            # The old server died during a restart: the new one resumes, as after a crash,
            # now or once it is ready.
            self._take_over()
            return None
        return self._after_server(status, child.serving)

    def _after_server(self, status: int | None, served: bool) -> int | None:
        """The server is gone: the exit status to exit with, or None after starting another."""
        fuse = self.held.get("fuse")
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
            _sd_notify("FDSTOREREMOVE=1\nFDNAME=fuse")
            _sd_notify("FDSTOREREMOVE=1\nFDNAME=ledger")
        for fd in self.held.values():
            os.close(fd)
        self.held = {}


def _send(child: Child, word: str, fds: Sequence[int] = ()) -> None:
    try:
        socket.send_fds(child.sock, [word.encode()], list(fds))
    except OSError as exc:
        log.warning("cannot tell server pid %d %r: %s", child.pid, word, exc.strerror)


def server_argv() -> list[str]:
    """The command that starts a server: this very `uenvfs serve` command."""
    return [sys.executable, "-m", "uenvfs", *sys.argv[1:]]


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
    held = stored_fds()
    if held and ("fuse" not in held or "ledger" not in held or not fusedev.alive(held["fuse"])):
        log.warning("systemd's store holds no live FUSE connection of uenvfs; mounting anew")
        for fd in held.values():
            os.close(fd)
        held = {}
    return Keeper(server_argv(), held).run()


def adopt_server() -> int:
    """A keeper started by a server whose keeper died: hold its descriptors and watch it."""
    info = json.loads(os.environ.pop(ENV_SERVER))
    held = {name: fd for name, fd in zip(("fuse", "ledger", "lock"), info["fds"], strict=True)
            if fd >= 0}
    for fd in [*held.values(), info["sock"]]:
        os.set_inheritable(fd, False)
    sock = socket.socket(fileno=info["sock"])
    try:
        keeper = Keeper(info["argv"], held, info["pid"], sock)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return 1  # the server is gone already
        raise
    keeper.ready_told = True
    if info.get("restart"):
        keeper.restart_first = True
    return keeper.run()
