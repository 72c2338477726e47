"""The daemon's query socket (`<state_dir>/socket`, server/queries.py) through a real daemon:
its answers, its bounds against a hostile user (nobody), and how it outlives the server (a
crash, the keeper's death, `uenvfs restart`); and `uenvfs attach`, which asks it within a
deadline, against a server that does not answer."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from uenvfs.client import exits
from uenvfs.core.queries import MAX_REQUEST, REQUEST_SECONDS
from uenvfs.server.queries import PER_UID

from ..mounts import is_mounted
from ..support import Daemon, wait_until
from ..uenv_images import meta_json

pytestmark = pytest.mark.fuse

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# As nobody: open N connections to the socket and send nothing; say how many of them the
# daemon closed within a second, then hold the others until stdin closes.
HOLDER = r"""
import select, socket, sys
path, count = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    held.append(sock)
closed, left, deadline = 0, list(held), 1.0
while left:
    ready, _, _ = select.select(left, [], [], deadline)
    if not ready:
        break
    for sock in ready:
        if sock.recv(1) == b"":
            closed += 1
        left.remove(sock)
print(closed, flush=True)
sys.stdin.read()
"""


def socket_of(daemon: Daemon) -> Path:
    return daemon.state_dir / "socket"


def ask(path: Path, request: dict[str, Any] | bytes, timeout: float = 30.0) -> dict[str, Any]:
    """One request, one answer, as `uenvfs attach` asks."""
    data = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(data)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer after {answer!r}"
            answer += chunk
    document: dict[str, Any] = json.loads(answer)
    return document


def allocation(daemon: Daemon, alloc: str) -> dict[str, Any]:
    return ask(socket_of(daemon), {"op": "allocation", "alloc": alloc})


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the daemon closes *sock* (unanswered) within *seconds*."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with what it sent unread
        return True
    except TimeoutError:
        return False


def test_the_answer_for_an_allocation(daemon: Daemon) -> None:
    for name in ("a", "b", "c"):
        daemon.image(name, {"f": name})
    daemon.start()
    path = socket_of(daemon)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    assert stat.S_IMODE(os.stat(daemon.state_dir).st_mode) == 0o755
    # `.socket` in the mount root leads there, listed and looked at without mounting anything.
    link = daemon.mountpoint / ".socket"
    assert os.readlink(link) == str(path)
    assert stat.filemode(os.lstat(link).st_mode) == "lrwxrwxrwx"
    assert ".socket" in os.listdir(daemon.mountpoint)
    assert subprocess.run(["ls", "-la", str(daemon.mountpoint)], capture_output=True,
                          check=False).returncode == 0
    assert daemon.backing_mounts() == []

    daemon.control("acquire b slurm-42")
    daemon.control("acquire a slurm-42")
    daemon.control("acquire c slurm-43")
    assert (daemon.mountpoint / "c/f").read_text() == "c"
    server = daemon.status()["server"]
    answer = allocation(daemon, "slurm-42")
    assert answer == {"ok": True, "alloc": "slurm-42", "server": server, "images": [
        {"name": "a", "image_path": str(daemon.images / "a.sqfs"), "state": "mounted",
         "error": None},
        {"name": "b", "image_path": str(daemon.images / "b.sqfs"), "state": "mounted",
         "error": None}]}
    assert allocation(daemon, "slurm-44")["images"] == []  # acquired nothing
    # nobody may ask too, through `.socket`.
    asked = subprocess.run([*NOBODY, "/usr/bin/python3", "-I", "-c",
                            "import socket, sys; s = socket.socket(socket.AF_UNIX); "
                            "s.connect(sys.argv[1]); "
                            "s.sendall(b'{\"op\": \"allocation\", \"alloc\": \"slurm-43\"}\\n'); "
                            "print(s.makefile().readline(), end='')", str(link)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert asked.returncode == 0, asked.stderr
    assert [i["name"] for i in json.loads(asked.stdout)["images"]] == ["c"]

    refused = {"ok": False, "errno": "EINVAL"}
    for request in ({"op": "allocation", "alloc": "a b"}, {"op": "allocation"},
                    {"op": "nope"}, {"alloc": "x"}, b"not json\n", b"[1, 2]\n", b"\xff\n"):
        answer = ask(path, request)
        assert {k: answer[k] for k in refused} == refused, request
        assert answer["error"], request
    daemon.control("release slurm-42")
    daemon.control("release slurm-43")
    assert allocation(daemon, "slurm-42")["images"] == []


def test_too_big_and_too_slow_requests_are_closed(daemon: Daemon) -> None:
    daemon.image("a", {"f": "a"})
    daemon.expect(r"query socket: closed a connection of pid \d+ uid 0 unanswered")
    daemon.start()
    path = socket_of(daemon)
    # Too big: a request of more than 64 KiB, sent at once, is closed unanswered, at once.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as big:
        big.connect(str(path))
        big.sendall(b'{"op": "allocation", "alloc": "' + b"x" * MAX_REQUEST)
        assert closed_within(big, 5.0)
    # Too slow: half a request, then nothing, is closed after REQUEST_SECONDS; a request made
    # meanwhile is answered at once.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(str(path))
        slow.sendall(b'{"op": "alloc')
        began = time.monotonic()
        assert allocation(daemon, "slurm-1")["ok"] is True
        assert time.monotonic() - began < 2.0
        assert closed_within(slow, REQUEST_SECONDS + 10)
        assert time.monotonic() - began > REQUEST_SECONDS - 0.5
    assert allocation(daemon, "slurm-1")["ok"] is True


def test_too_many_connections_from_nobody(daemon: Daemon) -> None:
    daemon.image("a", {"f": "a"})
    daemon.expect(r"query socket: closed a connection of pid \d+ uid 65534 unanswered")
    daemon.start()
    daemon.control("acquire a slurm-7")
    path = socket_of(daemon)
    extra = 8
    holder = subprocess.Popen([*NOBODY, "/usr/bin/python3", "-I", "-c", HOLDER, str(path),
                               str(PER_UID + extra)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        closed = int(holder.stdout.readline())
        # The connections past nobody's share were closed at once; root is answered while
        # nobody holds the others.
        assert closed == extra
        began = time.monotonic()
        assert [i["name"] for i in allocation(daemon, "slurm-7")["images"]] == ["a"]
        assert time.monotonic() - began < 2.0
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
    daemon.control("release slurm-7")


def test_the_socket_outlives_crashes_and_restarts(daemon: Daemon) -> None:
    daemon.image("a", {"f": "a"})
    daemon.expect(r"the keeper died: starting another")
    daemon.expect(r"keeper: server pid \d+ exited \(status unknown: not our child\)")
    daemon.expect(r"keeper: server pid \d+ was killed by SIGKILL")
    daemon.start()
    assert daemon.process is not None
    daemon.control("acquire a slurm-9")
    path = socket_of(daemon)
    inode = os.stat(path).st_ino  # the path of the socket the first server made

    # A query made while no server runs (the keeper, stopped, cannot start one) waits, and
    # the next server answers it.
    first = daemon.server_pid()
    keeper = daemon.process.pid
    answers: list[dict[str, Any] | Exception] = []

    def wait_for_answer() -> None:
        try:
            answers.append(allocation(daemon, "slurm-9"))
        except Exception as exc:  # the test shows it below
            answers.append(exc)

    os.kill(keeper, signal.SIGSTOP)
    try:
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{first}").exists() or Path(
            f"/proc/{first}/stat").read_text().split()[2] == "Z", what="the server to die")
        waiting = threading.Thread(target=wait_for_answer)
        waiting.start()
        time.sleep(1.0)
        assert answers == []
    finally:
        os.kill(keeper, signal.SIGCONT)
    waiting.join(60)
    answer = answers[0]
    assert isinstance(answer, dict), answer
    assert [i["name"] for i in answer["images"]] == ["a"]
    assert answer["server"]["pid"] not in (first, None)
    assert os.stat(path).st_ino == inode  # the same socket: the keeper held it

    # The keeper killed: the server starts another, which holds the socket too; the server
    # killed then: the next one gets it from the new keeper.
    server = daemon.server_pid()
    os.kill(keeper, signal.SIGKILL)
    daemon.process.wait()
    wait_until(lambda: len(daemon.processes_left()) == 2, what="a new keeper")
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: allocation(daemon, "slurm-9")["server"]["pid"] != server,
               what="a new server on the same socket")
    assert os.stat(path).st_ino == inode

    # `uenvfs restart`: the same socket again, answered by the new server.
    server = daemon.server_pid()
    out = daemon.cli("restart")
    assert out.returncode == 0, out.stderr
    answer = allocation(daemon, "slurm-9")
    assert answer["server"]["pid"] != server
    assert [i["name"] for i in answer["images"]] == ["a"]
    assert os.stat(path).st_ino == inode
    daemon.control("release slurm-9")
    keeper = next(pid for pid in daemon.processes_left()
                  if b"uenvfs.keeper" in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(keeper, signal.SIGTERM)
    wait_until(lambda: not daemon.processes_left(), what="the keeper and its server to stop")
    assert not path.exists()  # a clean stop: no server to ask


def attach(daemon: Daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`uenvfs attach ARGS` as the SPANK plugin runs it: as root, in a mount namespace of its
    own whose mounts are slaves of the host's (then the kernel mounts bound at
    /user-environment are counted)."""
    script = ('"$@" && grep " /user-environment " /proc/self/mountinfo | grep -c " - squashfs "')
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, "attach",
         sys.executable, "-m", "uenvfs", "attach", "--mountpoint", str(daemon.mountpoint),
         *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_attach_asks_the_socket_within_a_deadline(daemon: Daemon, mount_points: None) -> None:
    daemon.image("env", {"bin/tool": "#!/bin/sh\necho tool\n",
                         "meta/env.json": meta_json("env", "/user-environment", "tools")},
                 mode=0o755)
    daemon.start()
    daemon.control("acquire env slurm-5")
    done = attach(daemon, "slurm-5")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{daemon.images / 'env.sqfs'}:/user-environment\n1\n"
    done = attach(daemon, "--socket", str(socket_of(daemon)), "slurm-6")
    assert (done.returncode, done.stdout) == (1, "\n0\n")  # nothing acquired: nothing bound
    assert not is_mounted(Path("/user-environment"))

    # A server that does not answer (stopped): attach gives up after its --timeout, through
    # the socket named or through `.socket`, and says so in one line.
    server = daemon.server_pid()
    os.kill(server, signal.SIGSTOP)
    try:
        for args in (["--socket", str(socket_of(daemon))], []):
            began = time.monotonic()
            done = attach(daemon, *args, "--timeout", "2", "slurm-5", timeout=30)
            took = time.monotonic() - began
            assert done.returncode == exits.RUN_FAILED, done.stderr
            assert done.stderr == (f"uenvfs attach: uenvfs at {daemon.mountpoint} did not "
                                   "answer within 2 s\n")
            assert 2.0 <= took < 10.0, took
    finally:
        os.kill(server, signal.SIGCONT)
    nothing = daemon.root / "nothing"
    done = attach(daemon, "--socket", str(nothing), "slurm-5")
    assert done.returncode == exits.RUN_FAILED
    assert done.stderr == (f"uenvfs attach: no uenvfs serving at {daemon.mountpoint} (is the "
                           f"uenvfs service running?): {nothing}: "
                           f"{os.strerror(errno.ENOENT)}\n")
    daemon.control("release slurm-5")
