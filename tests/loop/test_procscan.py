"""The scan of /proc, on real processes and a real filesystem (the test's temporary one)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from uenvfs.kernel import procscan

HOLD = "import sys; sys.stdin.read()"


def test_a_scan_finds_working_directories_descriptors_and_their_descriptions(
    tmp_path: Path,
) -> None:
    held = tmp_path / "held"
    held.write_text("x")
    dev = os.stat(tmp_path).st_dev
    # One descriptor, inherited by a child and passed to another process over a socket: one
    # open file description in three processes. A fourth opens the file on its own.
    left, right = socket.socketpair()
    receiver = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys; s = socket.socket(fileno=int(sys.argv[1])); "
         "socket.recv_fds(s, 1, 1); print('got', flush=True); sys.stdin.read()",
         str(right.fileno())],
        pass_fds=[right.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=tmp_path)
    right.close()
    fd = os.open(held, os.O_RDONLY)
    inheritor = subprocess.Popen([sys.executable, "-c", HOLD], pass_fds=[fd],
                                 stdin=subprocess.PIPE, cwd="/")
    socket.send_fds(left, [b"x"], [fd])
    other = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1]); "
                              "print('open', flush=True); sys.stdin.read()", str(held)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert receiver.stdout is not None
        assert other.stdout is not None
        assert receiver.stdout.readline().strip() == "got"
        assert other.stdout.readline().strip() == "open"
        holds = procscan.scan(dev)
        ino = held.stat().st_ino
        on_file = [h for h in holds if h.kind == "fd" and h.ino == ino]
        pids = {h.pid for h in on_file}
        assert {os.getpid(), inheritor.pid, receiver.pid, other.pid} <= pids
        groups = procscan.descriptions(on_file)
        shared = next(g for g in groups if any(h.pid == inheritor.pid for h in g))
        assert {h.pid for h in shared} == {os.getpid(), inheritor.pid, receiver.pid}
        assert [h.pid for g in groups for h in g if g is not shared].count(other.pid) == 1
        # The receiver sits in the directory; the others do not.
        sitting = {h.pid for h in procscan.scan(dev, procscan.CWD_KINDS)
                   if h.ino == os.stat(tmp_path).st_ino}
        assert receiver.pid in sitting
        assert not {inheritor.pid, other.pid} & sitting
    finally:
        os.close(fd)
        left.close()
        for proc in (receiver, inheritor, other):
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
