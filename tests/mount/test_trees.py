"""The kernel path of `uenvfs run` (client/trees.py, the query socket's `tree`) with a real
daemon, as root and as unprivileged users: what is at the mount point is the image's own kernel
mount, one per image for every job of the node; the job's reads cost the server nothing and do
not pause while it is killed; a bind raced against expiry or against a replaced image gets the
right tree; and where the kernel mount cannot be bound, the FUSE directory is, as before.

/user-environment is created for the test if the machine has none (the `mount_points`
fixture); nothing is ever mounted on it outside the namespaces of the commands under test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from uenvfs.client import exits

from ..conftest import DaemonFactory
from ..support import Daemon, build_from_pack, loops_for, metric, mounts_under, wait_until
from ..uenv_images import meta_json
from .test_run import NOBODY, python_for_nobody, uenvfs

pytestmark = pytest.mark.fuse

USER_4242 = ["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups"]
USERS = {"root": [], "nobody": NOBODY, "uid 4242": USER_4242}
OWN_IDS = {"nobody": "65534", "uid 4242": "4242"}  # each user's uid and gid
META = meta_json("owned-env", "/user-environment", "default")
# Owners and modes of the image `owned`, as `stat -c '%n %u %g %a'` shows them to root.
OWNED = {"bin": "0 0 755", "bin/tool": "0 0 755", "share": "1234 5678 751",
         "share/data": "1234 5678 640", "share/nobodys": "65534 65534 600",
         "share/theirs": "4242 4242 604", "share/null": "0 0 666", "suid": "0 0 4755",
         "meta/env.json": "0 0 644"}
PACK = """\
dir /bin 0755 0 0
file /bin/tool 0755 0 0 tool
dir /share 0751 1234 5678
file /share/data 0640 1234 5678 data
file /share/nobodys 0600 65534 65534 data
file /share/theirs 0604 4242 4242 data
nod /share/null 0666 0 0 c 1 3
file /suid 4755 0 0 tool
dir /meta 0755 0 0
file /meta/env.json 0644 0 0 env.json
"""
# The mount table's fields of the mount at /user-environment: type, source, options.
MOUNT_AT = ("awk '$5 == \"/user-environment\" {for (i = 7; $i != \"-\"; i++); "
            "print $(i + 1), $(i + 2), $6}' /proc/self/mountinfo")
# In the job ($REMOUNT): an open of the image's device node, a remount of /user-environment
# that would drop nosuid and nodev, and the open again.
REMOUNT = textwrap.dedent("""\
    import ctypes, os

    def open_device():
        try:
            os.close(os.open("/user-environment/share/null", os.O_WRONLY))
            print("device opened")
        except OSError as exc:
            print("device", exc.strerror)

    libc = ctypes.CDLL(None, use_errno=True)
    MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 0x20, 0x1000
    open_device()
    done = libc.mount(None, b"/user-environment", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
    print("remount", "done" if done == 0 else os.strerror(ctypes.get_errno()))
    open_device()
""")


def device_of(daemon: Daemon, name: str) -> int:
    """The device of *name*'s backing mount (its squashfs superblock)."""
    return os.stat(daemon.backing_root / name).st_dev


def status_device(daemon: Daemon, name: str) -> str:
    """The device of *name*'s backing mount, as `.status` says."""
    entry = daemon.mount_status(name)
    assert entry is not None, f"{name} is not in .status"
    return str(entry["device"])


def server_ticks(pid: int) -> int:
    """The CPU time the process *pid* has used, in clock ticks (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


@pytest.fixture
def owned(daemon: Daemon, mount_points: None) -> Daemon:
    """A daemon serving `owned`: files of several owners and modes, a setuid file and a
    device node, built for /user-environment."""
    source = daemon.root / "owned-src"
    source.mkdir()
    (source / "tool").write_text("#!/bin/sh\necho tool\n")
    (source / "data").write_text("data\n")
    (source / "env.json").write_text(META)
    build_from_pack(daemon.images / "owned.sqfs", PACK, source)
    daemon.start()
    return daemon


@pytest.mark.parametrize("user", USERS)
def test_the_mount_point_is_the_images_kernel_mount(owned: Daemon, user: str) -> None:
    python = python_for_nobody()[0]  # its script imports no uenvfs
    done = uenvfs(owned, "run", "owned", user=USERS[user], env={"REMOUNT": REMOUNT},
                  command=["sh", "-c", f"{MOUNT_AT}; stat -c %d /user-environment; "
                           f"cd /user-environment && stat -c '%n %u %g %a' {' '.join(OWNED)} "
                           f'&& {python} -c "$REMOUNT"'])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # the kernel path: no line about binding through uenvfs
    lines = done.stdout.splitlines()
    fstype, source, options = lines[0].split()
    (backing,) = mounts_under(owned.backing_root)
    assert (fstype, source) == ("squashfs", backing.source)  # the daemon's loop device
    assert {"ro", "nosuid", "nodev"} <= set(options.split(","))
    # The very superblock the daemon mounted, whose device `.status` names.
    device = device_of(owned, "owned")
    assert int(lines[1]) == device
    assert status_device(owned, "owned") == f"{os.major(device)}:{os.minor(device)}"
    shown = dict(line.split(" ", 1) for line in lines[2:-3])
    if user == "root":
        assert shown == OWNED
    else:
        # Only the caller's own uid and gid are mapped in its user namespace: every other id
        # shows as the overflow id, 65534 (which is nobody's own too); modes are the image's.
        own = OWN_IDS[user]
        assert shown == {path: " ".join([*(i if i == own else "65534" for i in ids.split()[:2]),
                                         ids.split()[2]]) for path, ids in OWNED.items()}
    # The image's device node cannot be used (nodev). Root may remount its own bind as it
    # likes; for any other user the mount's flags are locked (it was copied into the user's
    # namespace): no remount, and the device node stays unusable.
    assert lines[-3:] == (["device Permission denied", "remount done", "device opened"]
                          if user == "root" else
                          ["device Permission denied", "remount Operation not permitted",
                           "device Permission denied"])


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_one_mount_per_image_for_every_job(owned: Daemon, user: str) -> None:
    """Jobs started at once, before the image is mounted: one loop device, one backing mount,
    one superblock that every job sees."""
    jobs = [subprocess.Popen(
        [*USERS[user], sys.executable, "-m", "uenvfs", "run", "owned", "--mountpoint",
         str(owned.mountpoint), "--", "sh", "-c",
         "stat -c %d /user-environment; cat /user-environment/meta/env.json >/dev/null; "
         "echo ready; read x || true"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(6)]
    devices = set()
    try:
        for job in jobs:
            assert job.stdout is not None
            device = job.stdout.readline()
            assert job.stdout.readline() == "ready\n", job.communicate()
            devices.add(int(device))
        assert devices == {device_of(owned, "owned")}
        assert len(loops_for(owned.images)) == 1
        assert [e.mount_point for e in mounts_under(owned.backing_root)] == [
            str(owned.backing_root / "owned")]
        assert metric(owned, 'uenvfs_mount_attempts_total{image="owned"}') == 1
    finally:
        for job in jobs:
            out, err = job.communicate("", timeout=60)
            assert (job.returncode, err) == (0, ""), out
    assert len(loops_for(owned.images)) == 1


# A job's reads: COUNT times open, read and close one of the image's files, once told to go.
READER = textwrap.dedent("""\
    import os, sys
    paths = [os.path.join(d, f) for d, _, fs in os.walk("/user-environment") for f in fs]
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(int(sys.argv[1])):
        with open(paths[i % len(paths)], "rb") as f:
            f.read()
    print("done", flush=True)
""")


def test_the_server_spends_no_cpu_on_the_jobs_reads(daemon: Daemon, mount_points: None) -> None:
    files = {f"lib/mod{i}.py": f"# module {i}\n" * 40 for i in range(200)}
    daemon.image("lib", {**files, "meta/env.json": META})
    daemon.start()
    pid = daemon.server_pid()
    job = subprocess.Popen(
        [sys.executable, "-m", "uenvfs", "run", "lib", "--mountpoint", str(daemon.mountpoint),
         "--", sys.executable, "-c", READER, "20000"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert job.stdin is not None
    assert job.stdout is not None
    try:
        assert job.stdout.readline() == "ready\n", job.communicate()
        before = server_ticks(pid)
        job.stdin.write("go\n")
        job.stdin.flush()
        assert job.stdout.readline() == "done\n", job.communicate()
        used = server_ticks(pid) - before
    finally:
        job.communicate("", timeout=60)
    # 20,000 opens through uenvfs cost its server about 4 s (400 ticks) here; through the
    # kernel mount, nothing but its own timers.
    print(f"the server used {used} ticks during 20,000 reads of the job")
    assert used <= 5, f"the server used {used} ticks during 20,000 reads of the job"


# A job's reads of PATH in a loop for SECONDS, each timed ("reading" once it reads): the
# longest gap between two of them.
GAPS = textwrap.dedent("""\
    import sys, time
    path, seconds = sys.argv[1], float(sys.argv[2])
    last = start = time.monotonic()
    gap = 0.0
    while last - start < seconds:
        with open(path, "rb") as f:
            f.read()
        now = time.monotonic()
        if last == start:
            print("reading", flush=True)
        gap = max(gap, now - last)
        last = now
        time.sleep(0.002)
    print(f"{gap:.4f}", flush=True)
""")


@pytest.mark.parametrize("how", ["killed", "stopped"])
@pytest.mark.parametrize("user", ["root", "nobody"])
def test_a_killed_or_hung_server_does_not_pause_the_jobs_reads(owned: Daemon, user: str,
                                                                how: str) -> None:
    """killed: `kill -9` of the server, which a new one replaces; stopped: `kill -STOP` for
    a second (a hung server)."""
    python = python_for_nobody()[0]  # its script imports no uenvfs
    job = subprocess.Popen(
        [*USERS[user], sys.executable, "-m", "uenvfs", "run", "owned", "--mountpoint",
         str(owned.mountpoint), "--", python, "-c", GAPS, "/user-environment/bin/tool", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert job.stdout is not None
    # What is measured is whether the reads wait for uenvfs, not for a CPU of this machine,
    # which other tests may share: the job comes before them.
    os.setpriority(os.PRIO_PROCESS, job.pid, -15)
    owned.expect(r"server pid \d+ was killed by SIGKILL")
    assert job.stdout.readline() == "reading\n", job.communicate()
    if how == "killed":
        old = owned.kill_server()
        wait_until(lambda: " resumed " in owned.log() and owned.server_pid() != old,
                   what="a new server")
    else:
        server = owned.kill_server(signal.SIGSTOP)
        time.sleep(1.0)
        os.kill(server, signal.SIGCONT)
    out, err = job.communicate(timeout=60)
    assert job.returncode == 0, err
    # Through uenvfs, the reads wait for the next server (0.3 s and more), or as long as the
    # server is stopped.
    print(f"the job's reads paused {float(out):.3f} s at most")
    assert float(out) < 0.1, f"the job's reads paused {float(out):.3f} s"


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_a_bind_raced_against_expiry(make_daemon: DaemonFactory, mount_points: None,
                                     user: str) -> None:
    """The image expires between any two steps of `uenvfs run`, also between the handout of
    its tree and the bind (a hold time of 0.05 s; the caller's allocation released, and
    `expire` written, again and again): every run gets the image's tree (through uenvfs where
    its kernel mount is gone from the job's namespace, which says so) or a clear error, never
    an empty or another one."""
    daemon = make_daemon(hold_time=0.05)
    daemon.image("racy", {"version": "v1\n", "meta/env.json": META})
    daemon.expect(r"release uid-\d+: failed: no image is used by")
    daemon.start()
    stop = threading.Event()
    alloc = "uid-0" if user == "root" else "uid-65534"

    def expire() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):  # nothing to release
                daemon.control(f"release {alloc}")
            daemon.control("expire")
            time.sleep(0.005)

    expiring = threading.Thread(target=expire)
    expiring.start()
    try:
        outcomes = [uenvfs(daemon, "run", "racy", user=USERS[user], command=[
            "sh", "-c", f"cat /user-environment/version; {MOUNT_AT}; ls /user-environment"])
            for _ in range(12)]
    finally:
        stop.set()
        expiring.join()
    kernel = fallback = 0
    for done in outcomes:
        if done.returncode == exits.RUN_FAILED:
            assert done.stderr.count("\n") == 1, done.stderr  # a clear error
            continue
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert (lines[0], lines[2:]) == ("v1", ["meta", "version"])
        if lines[1].split()[0] == "squashfs":
            assert done.stderr == ""
            kernel += 1
        else:
            assert lines[1].split()[0] == "fuse.uenvfs"
            assert "bound through uenvfs at /user-environment instead" in done.stderr
            fallback += 1
    print(f"{kernel} kernel binds, {fallback} through uenvfs, "
          f"{len(outcomes) - kernel - fallback} refused")
    assert kernel > 0
    # It did expire, before each run at least: mounted again and again. (Between the steps of
    # one run, test_a_bind_raced_against_a_replaced_image makes it expire for sure.)
    assert metric(daemon, 'uenvfs_mount_attempts_total{image="racy"}') >= len(outcomes)


# `uenvfs run` as root, with the image file replaced (and, with "expire", the image expired)
# just before the tree is asked for: after meta/env.json was read through uenvfs.
REPLACED = textwrap.dedent("""\
    import json, os, sys, time
    from uenvfs.client import run, trees
    image, new, mountpoint, how = sys.argv[1:5]
    asked = trees.ask_tree

    def ask_tree(*args, **kwargs):
        os.replace(new, image)
        while how == "expire":
            with open(os.path.join(mountpoint, ".control"), "w") as control:
                control.write("expire\\n")
            with open(os.path.join(mountpoint, ".status")) as status:
                if not any(m["name"] == "racy" for m in json.load(status)["mounts"]):
                    break
            time.sleep(0.02)
        return asked(*args, **kwargs)

    trees.ask_tree = ask_tree
    sys.exit(run.main(sys.argv[5:]))
""")


@pytest.mark.parametrize("how", ["replace", "expire"])
def test_a_bind_raced_against_a_replaced_image(daemon: Daemon, mount_points: None,
                                               how: str) -> None:
    """replace: the image stays mounted, its old version is what uenvfs serves and what the
    job gets. expire: it is mounted again, from the new file, for the job and uenvfs alike."""
    image = daemon.image("racy", {"version": "v1\n", "meta/env.json": META})
    daemon.start()
    new = daemon.root / "new.sqfs"
    build_from_pack(new, "file /version 0644 0 0 v\ndir /meta 0755 0 0\n"
                    "file /meta/env.json 0644 0 0 env.json\n", _source(daemon))
    done = subprocess.run(
        [sys.executable, "-c", REPLACED, str(image), str(new), str(daemon.mountpoint), how,
         "run", "racy", "--mountpoint", str(daemon.mountpoint), "--", "sh", "-c",
         "cat /user-environment/version; stat -c %d /user-environment"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    version, device = done.stdout.splitlines()
    served = (daemon.mountpoint / "racy" / "version").read_text().strip()
    assert (version, served) == (("v1", "v1") if how == "replace" else ("v2", "v2"))
    assert int(device) == device_of(daemon, "racy")
    assert status_device(daemon, "racy") == f"{os.major(int(device))}:{os.minor(int(device))}"


def _source(daemon: Daemon) -> Path:
    source = daemon.root / "v2-src"
    source.mkdir()
    (source / "v").write_text("v2\n")
    (source / "env.json").write_text(META)
    return source


def test_through_uenvfs_where_the_kernel_mount_cannot_be_bound(
        make_daemon: DaemonFactory, mount_points: None) -> None:
    """A state directory whose mnt/ nobody may traverse: nobody's `uenvfs run` binds the FUSE
    directory instead, says so in one line, and the image behaves as through uenvfs: it expires
    while unused, and is mounted again at the next access through the bind."""
    daemon = make_daemon(hold_time=0.5)
    daemon.image("greet", {"share/data.txt": "data of greet\n", "meta/env.json": META})
    daemon.start()
    daemon.backing_root.chmod(0o700)
    job = subprocess.Popen(
        [*NOBODY, sys.executable, "-m", "uenvfs", "run", "greet", "--mountpoint",
         str(daemon.mountpoint), "--", "sh", "-c",
         f"{MOUNT_AT}; cat /user-environment/share/data.txt; echo ready; read x; "
         "cat /user-environment/share/data.txt"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert job.stdin is not None
    assert job.stdout is not None
    try:
        lines = [job.stdout.readline() for _ in range(3)]
        assert [lines[0].split()[0], *lines[1:]] == ["fuse.uenvfs", "data of greet\n",
                                                     "ready\n"], job.communicate()
        wait_until(lambda: daemon.mount_status("greet") is None, what="greet to expire")
        assert not daemon.backing_mounted("greet")
        job.stdin.write("\n")
        job.stdin.flush()
        # Back at the next access through the bind, with no error.
        assert job.stdout.readline() == "data of greet\n"
        assert daemon.backing_mounted("greet")
    finally:
        _, err = job.communicate("", timeout=60)
    assert job.returncode == 0, err
    assert err == (f"uenvfs: greet: cannot reach its kernel mount at "
                   f"{daemon.backing_root / 'greet'}: Permission denied; bound through uenvfs "
                   "at /user-environment instead (every access goes through the daemon)\n")
