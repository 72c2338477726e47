"""The keeper's server processes: starting one, telling it a word, reaping it, and how it died
(the OOM killer, a signal, an exit status). What the keeper decides about them is in
keeper/keeper.py. The standard library only."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..kernel import mountinfo
from .protocol import (
    ENV_DIED,
    ENV_FDSTORE,
    ENV_HEARTBEAT,
    ENV_KEEPER,
    ENV_RESUME,
    ENV_SERVER,
    ENV_SOCKET,
    ENV_STANDBY,
    HEARTBEAT,
    HELD,
    SOCKET,
    socketpair,
)

log = logging.getLogger("uenvfs.keeper")


@dataclass(eq=False)
class Child:
    """A server process: the current one, or a new one getting ready to take over.

    Invariant: `pidfd` is open until the keeper reaps the server (`reap`); `sock` is open
    until then too, unless the server closed its end first.
    """

    pid: int
    pidfd: int
    sock: socket.socket
    serving: bool = False  # it said "ready"
    standby: bool = False  # a new server that said it is ready to take over
    handed: int | None = None  # the state an old server handed over (a memfd; -1: passed on)
    heard: float = 0.0  # when it last said something (time.monotonic())
    status: str = ""  # the last STATUS= it asked for
    oom_kills: int | None = None  # the memory cgroup's OOM kills when it started (None: unknown)


def spawn(argv: list[str], held: Mapping[str, int], resume: bool, standby: bool,
          watchdog: float, died: str | None = None) -> Child:
    """Start a server (*argv*): for a new connection, or to resume the *held* one (with the
    query socket, if held); *standby*: started by `restart`, it takes over once the old server
    has stopped. *watchdog*: systemd's WatchdogSec= (0: none), which sets how often the server
    must report. *died*: how the last server died, if it did (ENV_DIED)."""
    ours, theirs = socketpair()
    env = dict(os.environ)
    env[ENV_KEEPER] = str(theirs.fileno())
    env.pop(ENV_SERVER, None)
    env.pop(ENV_STANDBY, None)
    env.pop(ENV_FDSTORE, None)
    env.pop(ENV_DIED, None)
    if died is not None:
        env[ENV_DIED] = died
    if os.environ.get("NOTIFY_SOCKET"):
        env[ENV_FDSTORE] = "1"
    if standby:
        env[ENV_STANDBY] = "1"
    if watchdog:
        env[ENV_HEARTBEAT] = f"{min(HEARTBEAT, watchdog / 4):g}"
    pass_fds = [theirs.fileno()]
    if resume:
        fds = [held.get(name, -1) for name in HELD]
        env[ENV_RESUME] = ",".join(map(str, fds))
        pass_fds += [fd for fd in fds if fd >= 0]
    else:
        env.pop(ENV_RESUME, None)
    env.pop(ENV_SOCKET, None)
    if SOCKET in held:
        env[ENV_SOCKET] = str(held[SOCKET])
        pass_fds.append(held[SOCKET])
    process = subprocess.Popen(argv, env=env, pass_fds=pass_fds)
    theirs.close()
    child = Child(process.pid, os.pidfd_open(process.pid), ours, heard=time.monotonic(),
                  oom_kills=oom_kills())
    log.info("started server pid %d%s", process.pid,
             " to take over the connection" if standby else
             " to resume the connection" if resume else "")
    return child


def send(child: Child, word: str, fds: Sequence[int] = ()) -> None:
    """Tell *child* one message (see keeper/protocol.py); a server gone hears nothing."""
    try:
        socket.send_fds(child.sock, [word.encode()], list(fds))
    except OSError as exc:
        log.warning("cannot tell server pid %d %r: %s", child.pid, word, exc.strerror)


def reap(child: Child) -> int | None:
    """*child* exited: reap it if it is ours, and close its pidfd. Returns its exit status
    (negative: the signal that killed it), None if it is not our child (we replaced a keeper:
    its status is its parent's)."""
    status = None
    try:
        _, raw = os.waitpid(child.pid, 0)
        status = os.waitstatus_to_exitcode(raw)
    except ChildProcessError:
        pass
    os.close(child.pidfd)
    return status


def reap_strays(tracked: set[int]) -> None:
    """Reap the children not *tracked*: an old server that exited while this keeper was
    being executed again (it forgot them)."""
    while True:
        try:
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if found is None or found.si_pid in tracked:
            return
        os.waitpid(found.si_pid, 0)


def oom_kills() -> int | None:
    """How many processes of our memory cgroup (the keeper's, so its servers') the OOM killer
    has killed: `oom_kill` in memory.events (cgroup v2) or memory.oom_control (v1). None if
    there is no such file (no memory controller, or an older kernel)."""
    for path in _memory_counters():
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def _memory_counters() -> list[Path]:
    """The files of our memory cgroup that count OOM kills: under the cgroup2 mount, or the
    v1 hierarchy mounted at a directory named for the memory controller (as every init
    system mounts it: /sys/fs/cgroup/memory)."""
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = [m for m in mountinfo.read() if m.fstype in ("cgroup", "cgroup2")]
    except OSError:
        return []
    found = []
    for line in groups:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        for mount in mounts:
            if mount.fstype == "cgroup2" and not controllers:
                found.append(Path(mount.mount_point, relative, "memory.events"))
            elif (mount.fstype == "cgroup" and "memory" in controllers.split(",")
                  and "memory" in Path(mount.mount_point).name.split(",")):
                found.append(Path(mount.mount_point, relative, "memory.oom_control"))
    return found
