"""Mount namespaces that hold an image, through the real mount, as root and as nobody: a bind
of the daemon's backing mount in a namespace of a job's own (what `uenvfs run` makes of a tree
handed out) is a use of the job's allocation while any process is in that namespace, with no
file open and its working directory elsewhere; an expire leaves it, a force-unmount detaches
only the daemon's mount (the job keeps its tree), and a crash or a restart of the server
forgets nothing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ..conftest import DaemonFactory
from ..mounts import DEADLINE, loops_for
from ..support import Daemon, errno_of, wait_until

pytestmark = pytest.mark.fuse

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# How each user makes a mount namespace of its own: root a mount namespace only, nobody a
# user namespace too (where it is root, and may bind what it can reach).
UNSHARE = {
    "root": ["unshare", "--mount", "--propagation", "slave"],
    "nobody": [*NOBODY, "unshare", "--user", "--map-root-user", "--mount"],
}
ALLOC = {"root": "job-ns", "nobody": "uid-65534"}  # nobody's environment names no allocation

# In the namespace, once the bind is made: holds a file of it open, goes out of it, and at
# each line of stdin reads on in that file and reads a file and the listing anew.
READER = r"""
import json, os, sys
target = sys.argv[1]
held = open(os.path.join(target, "data"), "rb")
held.read(4096)
os.chdir("/")
print("in", flush=True)
for line in sys.stdin:
    with open(os.path.join(target, "f")) as fresh:
        text = fresh.read()
    print(json.dumps({"chunk": len(held.read(4096)), "f": text,
                      "listing": sorted(os.listdir(target))}), flush=True)
"""


def allocations(daemon: Daemon, name: str) -> dict[str, Any]:
    mount = daemon.mount_status(name)
    return {} if mount is None else dict(mount["allocations"])


def namespace_use(daemon: Daemon, name: str, alloc: str) -> bool:
    return allocations(daemon, name).get(alloc) == {
        "opens": 0, "acquired": False, "cwd": 0, "namespaces": 1}


def verify(daemon: Daemon) -> tuple[int, list[str]]:
    done = daemon.cli("status", "--verify", "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)["differences"]


@contextmanager
def holder(daemon: Daemon, user: str, name: str, command: Sequence[str],
           ) -> Iterator[subprocess.Popen[str]]:
    """A process in a mount namespace of its own, in which *name*'s backing mount is bound at
    a directory of the test (never its working directory), running *command* (it says "in"
    once ready; its stdin is a pipe). Killed at the end."""
    target = daemon.root / f"bind-{user}"
    target.mkdir(exist_ok=True)
    script = 'mount --bind "$1" "$2" && shift 2 && cd / && exec "$@"'
    env = {k: v for k, v in os.environ.items() if k not in ("PACT_ALLOCATION_ID", "SLURM_JOB_ID")}
    env["PACT_ALLOCATION_ID"] = ALLOC["root"]
    proc = subprocess.Popen([*UNSHARE[user], "sh", "-c", script, "holder",
                             str(daemon.backing_root / name), str(target), *command,
                             str(target)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd="/")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "in"
        assert not os.path.ismount(target)  # in its namespace only
        yield proc
    finally:
        proc.kill()
        proc.wait(DEADLINE)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


# Says it is in, and waits for its stdin to close: no file of the image open.
WAITER = ["sh", "-c", 'echo in && exec cat', "waiter"]


def end(proc: subprocess.Popen[str]) -> None:
    """Let a holder end (its stdin closes)."""
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(DEADLINE)


def ready(daemon: Daemon, name: str) -> None:
    """Mount *name* by a look inside, and wait until nothing uses it."""
    assert (daemon.mountpoint / name / "f").read_text() == "fresh\n"
    daemon.wait_idle(name)


@pytest.mark.parametrize("user", ALLOC)
def test_a_namespace_holding_an_image_keeps_it_until_it_ends(
    make_daemon: DaemonFactory, user: str,
) -> None:
    daemon = make_daemon(hold_time=1.0)
    daemon.image("acc", {"f": "fresh\n", "data": b"x" * 65536}, mode=0o755)
    daemon.start()
    ready(daemon, "acc")
    alloc = ALLOC[user]
    with holder(daemon, user, "acc", WAITER) as job:
        # A use of its allocation, seen within a second: a namespace, no file, no cwd.
        wait_until(lambda: namespace_use(daemon, "acc", alloc), timeout=2,
                   what="the namespace in .status")
        assert daemon.mount_status("acc")["state"] == "mounted"  # type: ignore[index]
        assert f"{alloc}(0+ns)" in daemon.cli("status").stdout
        # Several hold times later, still mounted and counted; verify agrees; so does expire.
        time.sleep(3.0)
        assert daemon.backing_mounted("acc")
        assert namespace_use(daemon, "acc", alloc)
        assert verify(daemon) == (0, [])
        daemon.control("expire")
        assert daemon.backing_mounted("acc")
        # Its last process ends: idle at the next scan, expired a hold time later.
        end(job)
        ended = time.monotonic()
        wait_until(lambda: not daemon.backing_mounted("acc"), what="acc to expire")
        took = time.monotonic() - ended
    assert took < 1.0 + 0.5 + 1.5, took  # the hold time, one rescan, and slack
    wait_until(lambda: loops_for(daemon.images) == [], what="the loop device to go")


@pytest.mark.parametrize("user", ALLOC)
def test_expire_and_force_unmount_while_a_namespace_holds_a_bind(
    make_daemon: DaemonFactory, user: str,
) -> None:
    daemon = make_daemon(hold_time=60.0)
    daemon.image("acc", {"f": "fresh\n", "data": b"x" * 65536}, mode=0o755)
    daemon.expect(r"emergency mode ON")
    daemon.expect(r"expire acc: failed: acc is in use by 1 allocations")
    daemon.expect(r"acc: FORCE-UNMOUNT, dropping allocations \['" + ALLOC[user] + r"'\]")
    daemon.expect(r"acc: a mount namespace of " + ALLOC[user] + r" \(processes \d+")
    daemon.start()
    ready(daemon, "acc")
    alloc = ALLOC[user]
    with holder(daemon, user, "acc", ["/usr/bin/python3", "-I", "-c", READER]) as job:
        assert job.stdin is not None
        assert job.stdout is not None

        def read() -> dict[str, Any]:
            job.stdin.write("go\n")  # type: ignore[union-attr]
            job.stdin.flush()  # type: ignore[union-attr]
            answer: dict[str, Any] = json.loads(job.stdout.readline())  # type: ignore[union-attr]
            return answer

        good = {"chunk": 4096, "f": "fresh\n", "listing": ["data", "f"]}
        wait_until(lambda: namespace_use(daemon, "acc", alloc), timeout=2,
                   what="the namespace in .status")
        # Expire leaves it: in use.
        assert errno_of(lambda: daemon.control("expire acc")) == errno.EPERM
        daemon.control("expire")
        assert daemon.backing_mounted("acc")
        # Force-unmount: the daemon's mount goes at once, the holder is named in the log, and
        # the job's open file and new reads in its bind go on.
        daemon.control("emergency on")
        daemon.control("force-unmount acc")
        assert not daemon.backing_mounted("acc")
        assert f"of {alloc} (processes {job.pid}" in daemon.log()
        status = daemon.mount_status("acc")
        assert status is not None
        assert (status["state"], status["error"], status["allocations"]) == (
            "failed", "force-unmounted", {})
        assert read() == good
        assert len(loops_for(daemon.images)) == 1  # the job's mount holds the loop device
        # A new access mounts anew: a second loop device while the job holds the first (the
        # one exception to one mount per image per node), which the scans do not count.
        assert (daemon.mountpoint / "acc/f").read_text() == "fresh\n"
        assert daemon.backing_mounted("acc")
        assert len(loops_for(daemon.images)) == 2
        daemon.wait_idle("acc")
        assert allocations(daemon, "acc") == {}
        assert read() == good
        end(job)
    wait_until(lambda: len(loops_for(daemon.images)) == 1, what="the job's loop device to go")
    daemon.control("emergency off")


def test_a_crash_and_a_restart_of_the_server_keep_the_namespace_uses(
    make_daemon: DaemonFactory,
) -> None:
    daemon = make_daemon(hold_time=1.0)
    daemon.image("acc", {"f": "fresh\n", "data": b"x"}, mode=0o755)
    daemon.expect(r"keeper: server pid \d+ was killed by SIGKILL")
    daemon.start()
    ready(daemon, "acc")
    with holder(daemon, "root", "acc", WAITER) as job:
        wait_until(lambda: namespace_use(daemon, "acc", "job-ns"), timeout=2,
                   what="the namespace in .status")
        # kill -9: the new server finds the namespace again; acc stays past its hold time.
        old = daemon.kill_server()
        wait_until(lambda: serving_other_than(daemon, old), what="a new server")
        time.sleep(2.5)
        assert daemon.backing_mounted("acc")
        assert namespace_use(daemon, "acc", "job-ns")
        assert verify(daemon) == (0, [])
        # A planned restart carries the use over.
        out = daemon.cli("restart")
        assert out.returncode == 0, out.stderr
        assert namespace_use(daemon, "acc", "job-ns")
        time.sleep(2.5)
        assert daemon.backing_mounted("acc")
        end(job)
        wait_until(lambda: not daemon.backing_mounted("acc"), what="acc to expire")
    wait_until(lambda: loops_for(daemon.images) == [], what="the loop device to go")


def serving_other_than(daemon: Daemon, old: int) -> bool:
    try:
        return daemon.server_pid() != old
    except OSError:
        return False


def test_the_copy_a_namespace_inherits_is_no_use(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(hold_time=1.0)
    daemon.image("acc", {"f": "fresh\n", "data": b"x"}, mode=0o755)
    daemon.start()
    ready(daemon, "acc")
    # A namespace made while acc is mounted has a copy of the daemon's mount at its place:
    # nobody's use (it goes with the daemon's where mounts propagate), so acc expires.
    env = {**os.environ, "PACT_ALLOCATION_ID": "job-copy"}
    job = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sh", "-c",
                            "echo in && exec cat"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=env, cwd="/")
    try:
        assert job.stdout is not None
        assert job.stdout.readline().strip() == "in"
        mounts = Path(f"/proc/{job.pid}/mountinfo").read_text()
        assert f" {daemon.backing_root / 'acc'} " in mounts
        assert allocations(daemon, "acc") == {}  # .status scans first
        wait_until(lambda: not daemon.backing_mounted("acc"), what="acc to expire")
    finally:
        end(job)
        if job.stdout is not None:
            job.stdout.close()
    wait_until(lambda: loops_for(daemon.images) == [], what="the loop device to go")
