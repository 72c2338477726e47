"""Uses FUSE does not see, through the real mount: processes sitting in an image (working
directory, root; also through a bind mount in their own namespace), and `status --verify`,
which compares every count with a scan of the processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ..conftest import DaemonFactory
from ..mounts import DEADLINE
from ..support import Daemon, metric, release_holder, spawn_holder, wait_until

pytestmark = pytest.mark.fuse

# Goes into a directory, says so, and goes where it is told (one line on stdin) each time.
WALKER = """
import os, sys
os.chdir(sys.argv[1])
print("in", flush=True)
for line in sys.stdin:
    os.chdir(line.strip())
    print("moved", flush=True)
"""


def job_env(alloc: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PACT_ALLOCATION_ID", "SLURM_JOB_ID")}
    env["PACT_ALLOCATION_ID"] = alloc
    return env


def walker(where: Path, alloc: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", WALKER, str(where)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=job_env(alloc), cwd="/")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "in"
    return proc


def move(proc: subprocess.Popen[str], where: str | Path) -> None:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(f"{where}\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "moved"


def stop(*procs: subprocess.Popen[Any]) -> None:
    """Kill *procs* and close their pipes."""
    for proc in procs:
        proc.kill()
        proc.wait(DEADLINE)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def allocations(daemon: Daemon, name: str) -> dict[str, Any]:
    mount = daemon.mount_status(name)
    return {} if mount is None else dict(mount["allocations"])


def seconds_until(what: Any, within: float = 1.0) -> float:
    """How long until *what*() is true (asking every 20 ms); fails after *within* s."""
    started = time.monotonic()
    while not what():
        assert time.monotonic() - started < within, "not within 1 s"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_shell_sitting_in_an_image_keeps_it_and_leaving_lets_it_expire(
    make_daemon: DaemonFactory,
) -> None:
    daemon = make_daemon(hold_time=1.0)
    daemon.image("acc", {"share/readme": "hello\n", "bin/tool": "x"})
    daemon.start()
    acc = daemon.mountpoint / "acc"
    assert (acc / "share/readme").read_text() == "hello\n"  # mounted; nothing open after
    daemon.wait_idle("acc")
    job = walker(acc / "share", "job-7")
    try:
        # .status says so within a second of the cd, as a use of its allocation.
        seconds_until(lambda: allocations(daemon, "acc").get("job-7") ==
                      {"opens": 0, "acquired": False, "cwd": 1, "namespaces": 0})
        status = daemon.mount_status("acc")
        assert status is not None
        assert (status["refcount"], status["state"]) == (1, "mounted")
        # Several hold times later the image is still mounted, and the job still counted.
        time.sleep(3.5)
        assert daemon.backing_mounted("acc")
        assert allocations(daemon, "acc")["job-7"]["cwd"] == 1
        # Neither `expire` nor the table lies about it.
        daemon.control("expire")
        assert daemon.backing_mounted("acc")
        assert "job-7(0+cwd)" in daemon.cli("status").stdout
        # Out of the image: .status says so within a second, and the image expires.
        move(job, "/")
        seconds_until(lambda: "job-7" not in allocations(daemon, "acc"))
        wait_until(lambda: not daemon.backing_mounted("acc"), what="acc to expire")
    finally:
        stop(job)


def test_a_root_in_an_image_and_a_thread_sitting_there_count_too(
    make_daemon: DaemonFactory,
) -> None:
    daemon = make_daemon(hold_time=60.0)
    daemon.image("acc", {"f": "x"})
    daemon.start()
    acc = daemon.mountpoint / "acc"
    assert (acc / "f").read_text() == "x"
    daemon.wait_idle("acc")
    # A thread that unshared its working directory (CLONE_FS) and sits in the image, while
    # the process's main thread stays outside.
    threaded = ("import ctypes, os, sys, threading\n"
                "def sit():\n"
                "    ctypes.CDLL(None).unshare(0x200)\n"
                "    os.chdir(sys.argv[1]); print('in', flush=True); sys.stdin.read()\n"
                "t = threading.Thread(target=sit); t.start(); t.join()\n")
    # A process whose root is the image, its working directory outside.
    rooted = ("import os, sys\n"
              "outside = os.open('/', os.O_RDONLY)\n"
              "os.chroot(sys.argv[1]); os.fchdir(outside)\n"
              "print('in', flush=True); sys.stdin.read()\n")
    jobs = [subprocess.Popen([sys.executable, "-c", code, str(acc)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=job_env(alloc), cwd="/")
            for code, alloc in ((threaded, "job-thread"), (rooted, "job-root"))]
    try:
        for job in jobs:
            assert job.stdout is not None
            assert job.stdout.readline().strip() == "in"
            assert os.readlink(f"/proc/{job.pid}/cwd") == "/"  # the process's own: outside
        seconds_until(lambda: {a: u["cwd"] for a, u in allocations(daemon, "acc").items()} ==
                      {"job-thread": 1, "job-root": 1})
    finally:
        stop(*jobs)


def test_a_bind_mount_in_a_private_namespace_is_counted(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(hold_time=60.0)
    daemon.image("acc", {"bin/tool": "x"})
    daemon.start()
    assert (daemon.mountpoint / "acc/bin/tool").read_text() == "x"
    daemon.wait_idle("acc")
    target = daemon.root / "user-environment"
    target.mkdir()
    # Its own mount namespace: the bind mount is seen by no one else, and it sits there.
    script = (f"mount --bind {daemon.mountpoint / 'acc'} {target} && cd {target}/bin && "
              "echo in && exec cat")
    job = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env=job_env("job-ns"))
    try:
        assert job.stdout is not None
        assert job.stdout.readline().strip() == "in"
        assert not os.path.ismount(target)  # not in our namespace
        seconds_until(lambda: allocations(daemon, "acc").get("job-ns", {}).get("cwd") == 1)
    finally:
        stop(job)
    seconds_until(lambda: "job-ns" not in allocations(daemon, "acc"))


# Opens a file of an image (job-a), hands its descriptor to a child started with another
# allocation (job-b) and, over a unix socket, to a process of a third (job-c); then closes its
# own and exits when told.
SHARER = """
import os, socket, subprocess, sys
path, receiver = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY)
child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE, pass_fds=[fd],
                         env={**os.environ, "PACT_ALLOCATION_ID": "job-b"})
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(receiver)
socket.send_fds(sock, [b"x"], [fd])
sock.close()
print(child.pid, flush=True)
sys.stdin.readline()
os.close(fd)
print("closed", flush=True)
sys.stdin.readline()
child.stdin.close()
child.wait()
"""

RECEIVER = """
import os, socket, sys
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1]); server.listen(1)
print("ready", flush=True)
conn, _ = server.accept()
_, fds, _, _ = socket.recv_fds(conn, 1, 1)
print(fds[0], flush=True)
sys.stdin.read()
"""


def verify(daemon: Daemon) -> tuple[int, list[str]]:
    done = daemon.cli("status", "--verify", "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)["differences"]


def test_verify_finds_descriptors_shared_by_fork_and_passed_over_a_socket(
    make_daemon: DaemonFactory,
) -> None:
    daemon = make_daemon(hold_time=60.0)
    daemon.image("acc", {"f": "shared"})
    daemon.expect("verify: acc: ")
    daemon.start()
    path = daemon.mountpoint / "acc/f"
    socket_path = daemon.root / "pass.sock"
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(socket_path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=job_env("job-c"))
    assert receiver.stdout is not None
    assert receiver.stdin is not None
    assert receiver.stdout.readline().strip() == "ready"
    sharer = subprocess.Popen([sys.executable, "-c", SHARER, str(path), str(socket_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=job_env("job-a"))
    assert sharer.stdout is not None
    assert sharer.stdin is not None
    try:
        int(sharer.stdout.readline())
        int(receiver.stdout.readline())
        # One open, by job-a: that is what FUSE saw. The processes of job-b and job-c hold
        # the same open file description, which verify finds and reports.
        assert allocations(daemon, "acc") == {"job-a": {"opens": 1, "acquired": False,
                                                        "cwd": 0, "namespaces": 0}}
        code, differences = verify(daemon)
        assert code == 1
        assert set(differences) == {
            f"acc: processes {_pids_of('job-b')} of job-b hold files there (fd), "
            "not counted for job-b",
            f"acc: processes {_pids_of('job-c')} of job-c hold files there (fd), "
            "not counted for job-c"}
        assert metric(daemon, "uenvfs_verify_differences") == 2
        # job-a closes its descriptor: the open is still counted for it (the description
        # lives on in the others), which verify reports as well.
        sharer.stdin.write("\n")
        sharer.stdin.flush()
        assert sharer.stdout.readline().strip() == "closed"
        code, differences = verify(daemon)
        assert "acc: job-a is counted with 1 open file(s), but no process of job-a holds a " \
               "file there" in differences
        # Every holder gone: the counts agree again.
        sharer.stdin.write("\n")
        sharer.stdin.flush()
        sharer.wait(DEADLINE)
        receiver.stdin.close()
        receiver.wait(DEADLINE)
        daemon.wait_idle("acc")
        assert verify(daemon) == (0, [])
        assert metric(daemon, "uenvfs_verify_differences") == 0
        assert daemon.cli("status", "--verify").stdout == "every count agrees with the processes\n"
    finally:
        stop(sharer, receiver)


def _pids_of(alloc: str) -> str:
    """The pids of the processes of *alloc* (by their environment), as verify lists them."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if f"PACT_ALLOCATION_ID={alloc}".encode() in environ.split(b"\0"):
                pids.append(int(entry.name))
    return ",".join(map(str, sorted(pids)))


def test_verify_agrees_with_open_files_mappings_and_programs(daemon: Daemon) -> None:
    daemon.image("acc", {"f": "held", "lib.bin": os.urandom(1 << 16)})
    daemon.image("tools", {"sleep": Path("/usr/bin/sleep").read_bytes()}, mode=0o755)
    daemon.start()
    acc = daemon.mountpoint / "acc"
    program = subprocess.Popen([str(daemon.mountpoint / "tools/sleep"), "600"],
                               env=job_env("job-exe"))
    holder = spawn_holder(acc / "f", "job-open")
    mapper = subprocess.Popen(
        [sys.executable, "-c", "import mmap, sys; f = open(sys.argv[1], 'rb'); "
         "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); f.close(); print('mapped', "
         "flush=True); sys.stdin.read()", str(acc / "lib.bin")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=job_env("job-map"))
    try:
        assert mapper.stdout is not None
        assert mapper.stdout.readline().strip() == "mapped"
        assert sorted(allocations(daemon, "acc")) == ["job-map", "job-open"]
        wait_until(lambda: "job-exe" in allocations(daemon, "tools"), what="the program")
        assert verify(daemon) == (0, [])
    finally:
        release_holder(holder)
        stop(mapper, program)
