"""systemd's file descriptor store keeps the FUSE connection when every uenvfs process dies.

This machine has no systemd as PID 1: a stand-in listens on NOTIFY_SOCKET, keeps what is
stored there (FDSTORE=1, FDNAME=) and forgets it on FDSTOREREMOVE=1, as systemd does; the next
`uenvfs serve` gets the descriptors back as systemd passes them (LISTEN_FDS, LISTEN_FDNAMES,
LISTEN_PID, descriptors from 3 on).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import Daemon, wait_until
from .test_resume import READER

pytestmark = pytest.mark.fuse

# Puts the given descriptors at 3, 4, ... and runs the command (`uenvfs serve`) as systemd
# would.
AS_SYSTEMD = r"""
import os, sys
names, fds, argv = sys.argv[1].split(":"), [int(fd) for fd in sys.argv[2].split(",")], sys.argv[3:]
high = [os.dup(fd) for fd in fds]
for index, fd in enumerate(high):
    if fd != 3 + index:
        os.dup2(fd, 3 + index)
    os.set_inheritable(3 + index, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                  LISTEN_FDNAMES=":".join(names))
os.execv(argv[0], argv)
"""

# Asks the query socket at argv[1] (waiting as long as it takes) and prints the answer.
ASK = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(b'{"op": "allocation", "alloc": "job-1"}\n')
print(sock.makefile().readline(), end="")
"""


class StandIn:
    """What systemd does with the notifications of a service: READY=1, FDSTORE=1 with FDNAME=,
    FDSTOREREMOVE=1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.stored: dict[str, int] = {}
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, 16)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.lock:
                self.messages.append(data.decode())
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTORE") == "1" and fds:
                    old = self.stored.pop(name, None)
                    if old is not None:
                        os.close(old)
                    self.stored[name] = fds[0]
                    fds = fds[1:]
                if fields.get("FDSTOREREMOVE") == "1" and name in self.stored:
                    os.close(self.stored.pop(name))
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        self.sock.close()
        with self.lock:
            for fd in self.stored.values():
                os.close(fd)
            self.stored.clear()


@pytest.fixture
def systemd(daemon: Daemon) -> Iterator[StandIn]:
    stand_in = StandIn(daemon.root / "notify.sock")
    daemon.env["NOTIFY_SOCKET"] = str(stand_in.path)
    try:
        yield stand_in
    finally:
        stand_in.close()


def test_the_store_keeps_the_connection_when_every_process_dies(
    daemon: Daemon, systemd: StandIn
) -> None:
    data = os.urandom(1 << 20)
    daemon.image("img", {"f": data, "g": "g", "small": "small"})
    daemon.start()
    wait_until(lambda: sorted(systemd.stored) == ["fuse", "ledger", "socket"],
               what="the connection and the query socket in the store")
    socket_inode = (daemon.state_dir / "socket").stat().st_ino
    # READY=1 follows the store (the keeper says it once the server answers).
    wait_until(lambda: any("READY=1" in m for m in systemd.messages), what="READY=1")
    # The job holding a file is a process of its own: this one must hold no file of the mount
    # while no server runs (a fork of it would close that file, which waits for a server).
    holder = subprocess.Popen([sys.executable, "-c", READER, str(daemon.mountpoint / "img/f"),
                               str(len(data) // 2)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None
    assert holder.stdout is not None
    reader: subprocess.Popen[str] | None = None
    asked: subprocess.Popen[str] | None = None
    try:
        assert holder.stdout.readline() == "ready\n"
        daemon.kill()  # keeper and server: without the store, the connection would end here
        reader = subprocess.Popen(["cat", str(daemon.mountpoint / "img/g")],
                                  stdout=subprocess.PIPE, text=True)
        asked = subprocess.Popen([sys.executable, "-c", ASK, str(daemon.state_dir / "socket")],
                                 stdout=subprocess.PIPE, text=True)
        with systemd.lock:
            names = ":".join(systemd.stored)
            fds = list(systemd.stored.values())
        log = daemon.log_path.open("ab")
        daemon.log_offset = daemon.log_path.stat().st_size
        daemon.process = subprocess.Popen(
            [sys.executable, "-c", AS_SYSTEMD, names, ",".join(map(str, fds)),
             *daemon.command()],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, pass_fds=fds,
            env={**os.environ, **daemon.env}, start_new_session=True)
        log.close()
        wait_until(lambda: " resumed " in daemon.log(), what="the connection resumed")
        out, _ = reader.communicate(timeout=30)
        assert (reader.returncode, out) == (0, "g")
        # The query socket was kept too: a query made while no uenvfs ran is answered.
        out, _ = asked.communicate(timeout=30)
        assert json.loads(out)["ok"] is True
        assert (daemon.state_dir / "socket").stat().st_ino == socket_inode
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        holder.stdin.write("go\n")
        holder.stdin.flush()
        report = json.loads(holder.stdout.readline())
        assert report["sha256"] == hashlib.sha256(data).hexdigest()
        assert daemon.status()["server"]["resumes"] == 1
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
        if reader is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                reader.communicate(timeout=5)
            reader.kill()
            reader.wait()
        if asked is not None:
            asked.kill()
            asked.communicate()
    daemon.wait_idle("img")
    assert daemon.stop() == 0
    assert systemd.stored == {}  # a clean stop ends the connection: nothing to resume


def test_status_and_the_watchdog(daemon: Daemon, systemd: StandIn) -> None:
    """STATUS= says what is served; with WatchdogSec= the keeper tells systemd it runs, and
    kills a server whose loop hangs, which a new one replaces (the job's read just waits)."""
    daemon.image("img", {"f": "f"})
    daemon.env["WATCHDOG_USEC"] = "2000000"  # WatchdogSec=2
    daemon.expect(r"said nothing for .* \(WatchdogSec=2\): killing it")
    daemon.expect("was killed by SIGKILL")
    daemon.start()

    def said(text: str) -> bool:
        with systemd.lock:
            return any(text in message for message in systemd.messages)

    wait_until(lambda: said("WATCHDOG=1"), what="WATCHDOG=1")
    wait_until(lambda: said("STATUS=0 images in use, 0 held idle, 0 failed; 0 allocations"),
               what="the first STATUS=")
    daemon.control("acquire img alloc-1")
    wait_until(lambda: said("STATUS=1 images in use, 0 held idle, 0 failed; 1 allocations"),
               what="STATUS= after an acquire")
    with systemd.lock:
        pings = sum("WATCHDOG=1" in m for m in systemd.messages)
    hung = daemon.server_pid()
    os.kill(hung, signal.SIGSTOP)  # a loop that never comes back
    reader = subprocess.Popen(["cat", str(daemon.mountpoint / "img/f")], stdout=subprocess.PIPE,
                              text=True)
    out, _ = reader.communicate(timeout=30)
    assert (reader.returncode, out) == (0, "f")
    assert daemon.server_pid() != hung
    assert daemon.mount_status("img")["allocations"]["alloc-1"]["acquired"] is True  # type: ignore[index]
    with systemd.lock:
        assert sum("WATCHDOG=1" in m for m in systemd.messages) > pings  # the keeper ran on
    daemon.control("release alloc-1")
    assert daemon.stop() == 0  # while the stand-in listens: STOPPING=1, FDSTOREREMOVE=1
