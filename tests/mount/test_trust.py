"""Identities that nobody can forge, and what resolving them costs, through a real mount
(issue 27): `nobody` names another job's allocation in its environment, makes cgroups named
like an allocation's where the resource manager does not put them, rewrites its environment
at run time, and sits in an image with 10,000 threads. Each attack failed before its fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uenvfs.kernel import mountinfo

from ..support import Daemon, release_holder, spawn_holder, wait_until

pytestmark = pytest.mark.fuse

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
PYTHON = "/usr/bin/python3"  # root's own interpreter may live where nobody cannot go
PLAIN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
SLURM_PROLOG = Path(__file__).resolve().parents[2] / "scripts" / "slurm" / "prolog"

# Opens each path given on stdin from a thread of its own, holds it, and says "opened" or the
# errno; `name NEW` writes NEW over PACT_ALLOCATION_ID in this process's own memory (what
# /proc/PID/environ shows: no exec), `hold PATH N` opens PATH until refused or N times.
OPENER = """
import ctypes, os, sys, threading
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_void_p
held = []
def in_a_thread(path):
    result = []
    def run():
        try:
            held.append(os.open(path, os.O_RDONLY))
            os.read(held[-1], 1)
            result.append(0)
        except OSError as exc:
            result.append(exc.errno)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]
for line in sys.stdin:
    word, *args = line.split()
    if word == "name":
        at = libc.getenv(b"PACT_ALLOCATION_ID")
        ctypes.memmove(at, args[0].encode(), len(args[0]))
        print("named", flush=True)
    elif word == "open":
        print("opened", in_a_thread(args[0]), flush=True)
    elif word == "hold":
        count, code = 0, 0
        while count < int(args[1]) and not code:
            code = in_a_thread(args[0])
            count += not code
        print("held", count, code, flush=True)
"""

# Sits in argv[1] (its working directory) with argv[2] threads, until stdin closes.
SITTER = """
import os, sys, threading
os.chdir(sys.argv[1])
threading.stack_size(64 * 1024)
go = threading.Event()
threads = [threading.Thread(target=go.wait) for _ in range(int(sys.argv[2]))]
for thread in threads:
    thread.start()
print("sitting", len(threads), flush=True)
sys.stdin.read()
go.set()
"""


class Nobody:
    """A Python program run as nobody, talked to a line at a time."""

    def __init__(self, code: str, *args: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        self.process = subprocess.Popen(
            [*(prefix or []), *NOBODY, PYTHON, "-I", "-c", code, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**PLAIN_ENV, **(env or {})}, cwd="/")

    def say(self, line: str) -> list[str]:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.read()

    def read(self) -> list[str]:
        assert self.process.stdout is not None
        answer = self.process.stdout.readline()
        if not answer:
            assert self.process.stderr is not None
            raise AssertionError(f"the program of nobody ended: {self.process.stderr.read()}")
        return answer.split()

    def open(self, path: Path) -> int:
        """Open *path* from a new thread and hold it: 0 or the errno."""
        return int(self.say(f"open {path}")[1])

    def rename(self, alloc: str) -> None:
        """Write *alloc* over PACT_ALLOCATION_ID in place; the daemon's reading of the
        process is renewed once it is 50 ms old."""
        assert self.say(f"name {alloc}") == ["named"]
        time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def allocations(daemon: Daemon, image: str) -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, object]] = (daemon.mount_status(image) or {}).get(
        "allocations", {})
    return found


def opens(daemon: Daemon, image: str) -> dict[str, object]:
    """allocation -> its open handles in *image*."""
    return {alloc: use["opens"] for alloc, use in allocations(daemon, image).items()
            if use["opens"]}


def metric(text: str, name: str) -> float:
    """The value of *name* in the `.metrics` *text*, which must be there."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"no {name} in .metrics")


def test_a_job_id_in_the_environment_of_another_user_is_not_that_job(daemon: Daemon) -> None:
    daemon.image("img", {f"f{n}": str(n) for n in range(40)})
    daemon.config = "open_files_per_allocation = 20\n"
    daemon.expect(r"uid-65534 holds \d+ open files in images: over .*; open refused")
    daemon.start()
    image = daemon.mountpoint / "img"
    job = spawn_holder(image / "f0", extra_env={"SLURM_JOB_ID": "1001"})  # root's job
    poser = Nobody(OPENER, env={"SLURM_JOB_ID": "1001"})
    try:
        held, code = map(int, poser.say(f"hold {image / 'f1'} 40")[1:])
        assert code == errno.EMFILE  # its own share, whatever it is
        # nobody's opens are its own, not job 1001's (before: all of them counted for
        # slurm-1001, which then could not open a file: EMFILE, its share used up).
        assert opens(daemon, "img") == {"slurm-1001": 1, "uid-65534": held}
        more = spawn_holder(image / "f2", extra_env={"SLURM_JOB_ID": "1001"})
        assert opens(daemon, "img") == {"slurm-1001": 2, "uid-65534": held}
        release_holder(more)
    finally:
        poser.stop()
        release_holder(job)


@pytest.fixture
def own_cgroup() -> Iterator[Path]:
    """A cgroup given to nobody (as systemd delegates user@.service), at a place no layout
    names: /uenvfs-trust-<random> in the cgroup2 hierarchy. Removed with what nobody made
    below it."""
    roots = [e.mount_point for e in mountinfo.read() if e.fstype == "cgroup2"]
    if not roots:
        pytest.skip("no cgroup2 hierarchy is mounted on this machine")
    group = Path(roots[0]) / f"uenvfs-trust-{secrets.token_hex(4)}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup here: {exc}")
    for path in (group, group / "cgroup.procs"):
        os.chown(path, 65534, 65534)
    yield group
    for directory in [*sorted(group.rglob("*"), key=lambda p: -len(p.parts)), group]:
        if not directory.is_dir():
            continue
        for _ in range(100):  # until its processes are gone
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.05)


# nobody makes these below its own cgroup and moves itself there; the same names at the
# root of the hierarchy (where pact and Slurm put them) would name `slurm-77` and `x`.
@pytest.mark.parametrize("made", ["job_77", "workload.slice/x.scope",
                                  "system.slice/slurmstepd.scope/job_77"])
def test_a_cgroup_made_by_a_user_names_no_allocation(daemon: Daemon, own_cgroup: Path,
                                                     made: str) -> None:
    daemon.image("img", {"f": "f"})
    daemon.start()
    code = ("import os, sys\n"
            "target = os.path.join(sys.argv[1], sys.argv[2])\n"
            "os.makedirs(target)\n"
            "with open(os.path.join(target, 'cgroup.procs'), 'w') as procs:\n"
            "    procs.write(str(os.getpid()))\n"
            "print(open('/proc/self/cgroup').read().replace('\\n', ' '), flush=True)\n"
            "f = open(sys.argv[3], 'rb'); f.read(1)\n"
            "print('open', flush=True)\n"
            "sys.stdin.read()\n")
    # Root puts the process in the cgroup given to nobody; nobody does the rest.
    into = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(own_cgroup)]
    user = Nobody(code, str(own_cgroup), made, str(daemon.mountpoint / "img/f"), prefix=into,
                  env={"PACT_ALLOCATION_ID": "x", "SLURM_JOB_ID": "77"})
    try:
        assert f"0::/{own_cgroup.name}/{made}" in " ".join(user.read())
        assert user.read() == ["open"]
        # Before: `slurm-77` or `x` (a cgroup name matched at any depth).
        assert opens(daemon, "img") == {"uid-65534": 1}
    finally:
        user.stop()


def test_a_cgroup_at_a_configured_layout_names_its_allocation_and_owner(
    daemon: Daemon, own_cgroup: Path
) -> None:
    """Where root (the resource manager) puts the processes of an allocation, the cgroup names
    it, whatever their environment; and from then on their user's processes may name it in
    their environment, other users' may not."""
    daemon.image("img", {"f": "f", "g": "g", "h": "h"})
    daemon.config = f'cgroup_layouts = ["/{own_cgroup.name}/alloc_{{id}}"]\n'
    daemon.start()
    scope = own_cgroup / "alloc_site-9"
    scope.mkdir()
    into = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(scope)]
    member = Nobody(OPENER, prefix=into, env={"PACT_ALLOCATION_ID": "other"})
    outside = Nobody(OPENER, env={"PACT_ALLOCATION_ID": "site-9"})
    try:
        assert outside.open(daemon.mountpoint / "img/h") == 0  # before any is seen there
        assert member.open(daemon.mountpoint / "img/f") == 0
        time.sleep(0.1)
        assert outside.open(daemon.mountpoint / "img/g") == 0
        assert opens(daemon, "img") == {"site-9": 2, "uid-65534": 1}
        owners = metric((daemon.mountpoint / ".metrics").read_text(), "uenvfs_allocation_owners")
        assert owners == 1
    finally:
        member.stop()
        outside.stop()


def test_a_process_that_renames_itself_moves_only_between_its_own_allocations(
    daemon: Daemon,
) -> None:
    daemon.image("img", {f"f{n}": str(n) for n in range(8)})
    daemon.start()
    image = daemon.mountpoint / "img"
    job = spawn_holder(image / "f0", alloc="root-0001")
    renamer = Nobody(OPENER, env={"PACT_ALLOCATION_ID": "mine-0001"})
    try:
        renamer.rename("root-0001")
        assert renamer.open(image / "f1") == 0
        assert opens(daemon, "img") == {"root-0001": 1, "uid-65534": 1}  # before: root-0001's
        daemon.control("acquire img mine-0001 65534")  # nobody's, as a prolog says
        for n, name in enumerate(["mine-0001", "root-0001", "else-0001", "mine-0001"], 2):
            renamer.rename(name)
            assert renamer.open(image / f"f{n}") == 0
        # Before: root-0001 got two of them, else-0001 one.
        assert opens(daemon, "img") == {"root-0001": 1, "mine-0001": 2, "uid-65534": 3}
    finally:
        renamer.stop()
        release_holder(job)
        with contextlib.suppress(OSError):  # the image must not stay acquired
            daemon.control("release mine-0001")


def test_the_owner_of_an_acquisition_outlives_a_crash_and_goes_with_the_job(
    daemon: Daemon,
) -> None:
    """The Slurm prolog names the job's user (SLURM_JOB_UID); the journal keeps it."""
    daemon.image("img", {"f": "f", "g": "g", "h": "h"})
    daemon.expect(r"server pid \d+ was killed by SIGKILL")
    daemon.start()
    uenvfs = daemon.root / "uenvfs"
    uenvfs.write_text(f'#!/bin/sh\nexec {sys.executable} -m uenvfs "$@"\n')
    uenvfs.chmod(0o755)
    slurmd = {"SLURM_JOB_ID": "1002", "UENVFS_MOUNTPOINT": str(daemon.mountpoint),
              "UENVFS": str(uenvfs)}
    done = subprocess.run([str(SLURM_PROLOG)], capture_output=True, text=True, timeout=120,
                          env={**slurmd, "SLURM_JOB_UID": "65534",
                               "SLURM_JOB_COMMENT": "uenv=img"}, check=False)
    assert done.returncode == 0, done.stderr
    assert "acquired img for slurm-1002 (uid 65534)" in done.stderr
    old = daemon.kill_server()
    wait_until(lambda: " resumed " in daemon.log() and daemon.server_pid() != old,
               what="a new server")
    user = Nobody(OPENER, env={"SLURM_JOB_ID": "1002"})
    try:
        assert user.open(daemon.mountpoint / "img/f") == 0
        assert opens(daemon, "img") == {"slurm-1002": 1}
        daemon.control("release slurm-1002")  # the epilog: the job is gone, and its owner
        time.sleep(0.1)
        assert user.open(daemon.mountpoint / "img/g") == 0
        assert opens(daemon, "img") == {"uid-65534": 1}
        # A prolog without SLURM_JOB_UID (an older slurmd's) acquires as before.
        done = subprocess.run([str(SLURM_PROLOG)], capture_output=True, text=True,
                              timeout=120, env={**slurmd, "SLURM_JOB_COMMENT": "uenv=img"},
                              check=False)
        assert done.returncode == 0, done.stderr
        assert allocations(daemon, "img")["slurm-1002"]["acquired"] is True
    finally:
        user.stop()
        with contextlib.suppress(OSError):  # the images must not stay acquired
            daemon.control("release slurm-1002")


def test_a_process_with_many_threads_in_an_image_is_resolved_once_per_scan(
    daemon: Daemon,
) -> None:
    threads = min(10_000, int(Path("/proc/sys/kernel/pid_max").read_text()) // 3)
    daemon.image("img", {"d/f": "f"})
    daemon.image("other", {"f": "other"})
    daemon.start()
    sitter = Nobody(SITTER, str(daemon.mountpoint / "img/d"), str(threads))
    try:
        assert sitter.read() == ["sitting", str(threads)]
        wait_until(lambda: allocations(daemon, "img").get("uid-65534", {}).get("cwd") == 1,
                   what="nobody's process sitting in img")  # one process, however many threads
        before = (daemon.mountpoint / ".metrics").read_text()
        slowest, reads_of_other, began = 0.0, 0, time.monotonic()
        while time.monotonic() - began < 3.0:
            (daemon.mountpoint / ".status").read_bytes()  # a scan at most 0.5 s old
            started = time.monotonic()
            assert (daemon.mountpoint / "other/f").read_text() == "other"
            slowest = max(slowest, time.monotonic() - started)
            reads_of_other += 1
            time.sleep(0.1)
        print(f"{threads} threads: {reads_of_other} reads of another image, the slowest "
              f"{slowest * 1000:.1f} ms")
        after = (daemon.mountpoint / ".metrics").read_text()
        scanned, resolved = (metric(after, name) - metric(before, name) for name in (
            "uenvfs_process_scans_total", "uenvfs_identity_reads_total"))
        print(f"{scanned:g} scans, {resolved:g} processes read")
        assert scanned >= 3
        # Each scan reads nobody's process once (before: each of its threads, in the event
        # loop: seconds), and each open of other/f this process (its reading is 50 ms old).
        assert resolved <= 2 * scanned + reads_of_other + 10
    finally:
        sitter.stop()
