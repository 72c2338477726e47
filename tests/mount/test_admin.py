"""`.control`, the admin CLI, emergency mode and signals, through the real mount."""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uenvfs.client import exits

from ..support import Daemon, errno_of, release_holder, run_in, spawn_holder, wait_until

pytestmark = pytest.mark.fuse


@pytest.fixture
def served(daemon: Daemon) -> Daemon:
    for name in ("a", "b"):
        daemon.image(name, {"f": name * 3, "big": os.urandom(1 << 20)})
    daemon.expect("control from .*(rejected|failed)")  # refused commands are warnings
    daemon.start()
    return daemon


def state_of(daemon: Daemon, name: str) -> tuple[str, int, dict[str, object]] | None:
    m = daemon.mount_status(name)
    return None if m is None else (m["state"], m["refcount"], m["allocations"])


def test_acquire_and_release(served: Daemon) -> None:
    served.control("acquire a slurm-7")
    assert state_of(served, "a") == (
        "mounted", 1, {"slurm-7": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}})
    assert served.backing_mounted("a")
    served.control("acquire a alloc-2\nacquire b alloc-2")
    assert state_of(served, "a")[1] == 2  # type: ignore[index]
    served.control("release alloc-2 a")
    assert state_of(served, "a")[1] == 1  # type: ignore[index]
    assert state_of(served, "b")[1] == 1  # type: ignore[index]
    served.control("release alloc-2")
    assert state_of(served, "b")[:2] == ("holding", 0)  # type: ignore[index]
    served.control("release slurm-7")
    assert state_of(served, "a")[:2] == ("holding", 0)  # type: ignore[index]


def test_release_forgets_open_handles(served: Daemon) -> None:
    holder = spawn_holder(served.mountpoint / "a/f", alloc="alloc-9")
    try:
        assert state_of(served, "a")[1] == 1  # type: ignore[index]
        served.control("release alloc-9")
        assert state_of(served, "a")[:2] == ("holding", 0)  # type: ignore[index]
    finally:
        release_holder(holder)
    # The late close changed nothing, and nothing went negative.
    assert state_of(served, "a")[:2] == ("holding", 0)  # type: ignore[index]
    assert "RefcountInconsistency" not in served.log()


def test_reconcile_keeps_only_live_allocations(served: Daemon) -> None:
    for alloc in ("alloc-1", "alloc-2", "alloc-3"):
        served.control(f"acquire a {alloc}")
    served.control("acquire b alloc-3")
    served.control("reconcile alloc-2 alloc-99")
    assert state_of(served, "a") == (
        "mounted", 1, {"alloc-2": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}})
    assert state_of(served, "b")[:2] == ("holding", 0)  # type: ignore[index]
    served.control("acquire b alloc-3")
    served.control("reconcile --none")  # no allocation lives
    assert [state_of(served, n)[:2] for n in "ab"] == [("holding", 0)] * 2  # type: ignore[index]
    # A bare `reconcile` keeps its old meaning in .control, with a warning in the log.
    served.expect("a bare 'reconcile' releases every allocation on the node")
    served.control("acquire a alloc-2")
    served.control("reconcile")
    assert state_of(served, "a")[:2] == ("holding", 0)  # type: ignore[index]
    assert "a bare 'reconcile' releases every allocation" in served.log()


README = Path(__file__).parents[2] / "README.md"


@pytest.mark.parametrize(("squeue", "kept"), [
    ("exit 1", {"slurm-1", "slurm-2"}),  # slurmctld unreachable: nothing is released
    ("echo slurm-2", {"slurm-2"}),
    ("exit 0", set()),  # no job on the node
])
def test_the_readme_recovery_recipe(served: Daemon, squeue: str, kept: set[str]) -> None:
    """The README's line after an outage, run by bash as written there."""
    recipe = next(line.strip() for line in README.read_text().splitlines()
                  if "squeue" in line and "uenvfs reconcile" in line)
    bin_dir = served.root / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("squeue", squeue), ("uenvfs", f'exec {sys.executable} -m uenvfs "$@" '
                                                      f"--mountpoint {served.mountpoint}")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for alloc in ("slurm-1", "slurm-2"):
        served.control(f"acquire a {alloc}")
    done = subprocess.run(["bash", "-c", recipe], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == (1 if squeue == "exit 1" else 0), done.stderr
    entry = served.mount_status("a")
    assert entry is not None
    assert set(entry["allocations"]) == kept
    served.control("reconcile --none")


def test_expire_and_hold_time(served: Daemon) -> None:
    served.control("acquire a alloc-1")
    assert (served.mountpoint / "b/f").read_text() == "bbb"
    served.control("expire")
    assert not served.backing_mounted("b")
    assert served.backing_mounted("a")
    assert errno_of(lambda: served.control("expire a")) == errno.EPERM
    served.control("hold-time 0.3 a")
    served.control("release alloc-1")
    assert served.status()["hold_time"] == 60.0
    wait_until(lambda: not served.backing_mounted("a"), what="the per-image hold time")
    served.control("hold-time 120")
    assert served.status()["hold_time"] == 120.0


def test_command_errors_have_their_errno(served: Daemon) -> None:
    cases = {
        "bad": errno.EINVAL,
        "acquire a": errno.EINVAL,
        "hold-time -5": errno.EINVAL,
        "acquire nosuch alloc-1": errno.ENOENT,
        "release alloc-404": errno.ENOENT,
        "force-unmount a": errno.EPERM,
        "expire nosuch": errno.ENOENT,
    }
    for line, code in cases.items():
        assert errno_of(functools.partial(served.control, line)) == code, line
    log = served.log()
    assert "rejected b'bad\\n': unknown command 'bad'" in log
    assert "force-unmount a: failed: force-unmount is only allowed in emergency mode" in log
    assert served.status()["mounts"] == []


def test_shell_sees_the_errno_messages(served: Daemon) -> None:
    ctl = served.mountpoint / ".control"
    # bash's echo and coreutils' echo report the errno (dash's says "I/O error" for any).
    bad = run_in("/", f"bash -c 'echo bad > {ctl}'")
    assert "write error: Invalid argument" in bad.stderr
    refused = run_in("/", f"/bin/echo force-unmount a > {ctl}")
    assert "write error: Operation not permitted" in refused.stderr
    nobody = run_in("/", f"setpriv --reuid=65534 --regid=65534 --clear-groups "
                         f"sh -c 'echo expire > {ctl}'")
    assert f"cannot create {ctl}: Permission denied" in nobody.stderr
    ok = run_in("/", f"echo expire > {ctl}")
    assert ok.returncode == 0, ok.stderr
    assert "control from pid" in served.log()


def test_control_is_write_only_and_status_read_only(served: Daemon) -> None:
    mode = os.stat(served.mountpoint / ".control").st_mode & 0o777
    assert mode == 0o200
    assert os.stat(served.mountpoint / ".status").st_mode & 0o777 == 0o444
    assert errno_of(lambda: (served.mountpoint / ".control").read_text()) == errno.EACCES
    assert errno_of(lambda: open(served.mountpoint / ".status", "w")) == errno.EROFS  # noqa: SIM115


def test_force_unmount_in_emergency(served: Daemon) -> None:
    served.expect("FORCE-UNMOUNT")
    served.expect("emergency mode ON")
    served.expect("open handles now fail with EIO")
    code = ("import sys, time\n"
            "f = open(sys.argv[1], 'rb'); f.read(4096); print('open', flush=True)\n"
            "sys.stdin.readline()\n"
            "try:\n    f.seek(0); f.read(4096); print('read ok')\n"
            "except OSError as e:\n    print('errno', e.errno)\n")
    holder = subprocess.Popen(["python3", "-c", code, str(served.mountpoint / "a/big")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PACT_ALLOCATION_ID": "job-1"})
    assert holder.stdout is not None
    assert holder.stdin is not None
    assert holder.stdout.readline() == "open\n"
    served.control("acquire a job-2")
    assert (served.mountpoint / "b/f").read_text() == "bbb"
    assert errno_of(lambda: served.control("force-unmount a")) == errno.EPERM
    served.control("emergency on")
    assert served.status()["emergency"] is True
    served.control("force-unmount a")
    assert not served.backing_mounted("a")
    m = served.mount_status("a")
    assert m is not None
    assert (m["state"], m["error"], m["refcount"], m["allocations"]) == (
        "failed", "force-unmounted", 0, {})
    holder.stdin.write("go\n")
    holder.stdin.flush()
    out, _ = holder.communicate(timeout=30)
    assert out == f"errno {errno.EIO}\n"  # even though the page was cached
    assert (served.mountpoint / "b/f").read_text() == "bbb"  # the others keep serving
    assert (served.mountpoint / "a/f").read_text() == "aaa"  # a new use mounts it again
    assert state_of(served, "a")[0] == "holding"  # type: ignore[index]
    served.control("emergency off")
    assert served.status()["emergency"] is False


def test_admin_cli(served: Daemon) -> None:
    served.expect("emergency mode ON")
    served.expect("FORCE-UNMOUNT")
    ok = served.cli("acquire", "a", "alloc-1")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    assert state_of(served, "a")[1] == 1  # type: ignore[index]
    assert served.cli("hold-time", "5", "a").returncode == 0
    assert served.cli("expire").returncode == 0
    swapped = served.cli("release", "a", "alloc-1")  # acquire takes NAME ALLOC, release not
    assert swapped.returncode == exits.FAILED
    assert swapped.stderr.strip().endswith(
        "did you mean 'uenvfs release alloc-1 a'? (release takes the allocation first)")
    assert state_of(served, "a")[1] == 1  # type: ignore[index]
    assert served.cli("release", "alloc-1", "a").returncode == 0
    bare = served.cli("reconcile")  # e.g. `uenvfs reconcile $(squeue ...)` with squeue failing
    assert bare.returncode == exits.USAGE
    assert "reconcile needs the live allocations, or --none" in bare.stderr
    assert served.cli("reconcile", "--none").returncode == 0
    assert served.cli("reload").returncode == 0
    failed = served.cli("force-unmount", "a")
    assert failed.returncode == exits.FAILED
    assert failed.stderr.strip() == (
        "uenvfs force-unmount: force-unmount a: Operation not permitted "
        "(the daemon's log has the details)")
    assert "Traceback" not in failed.stderr
    missing = served.cli("release", "nobody-here")
    assert missing.returncode == exits.FAILED
    assert "No such file or directory" in missing.stderr
    usage = served.cli("hold-time", "soon")
    assert usage.returncode == exits.USAGE
    assert "not a number" in usage.stderr
    assert served.cli("emergency", "on").returncode == 0
    assert served.cli("force-unmount", "a").returncode == 0
    assert served.cli("emergency", "off").returncode == 0
    helptext = served.cli("--help")
    assert "exit codes" in helptext.stdout


def test_sigusr1_expires_and_sighup_reloads(served: Daemon) -> None:
    assert served.process is not None
    served.control("acquire a alloc-1")
    assert (served.mountpoint / "b/f").read_text() == "bbb"
    served.process.send_signal(signal.SIGUSR1)
    wait_until(lambda: not served.backing_mounted("b"), what="SIGUSR1 to expire b")
    assert served.backing_mounted("a")
    served.image("c", {"f": "new"})
    assert "c" not in os.listdir(served.mountpoint)  # sources are read at start and reload
    served.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "c" in os.listdir(served.mountpoint), what="SIGHUP to reload")
    assert (served.mountpoint / "c/f").read_text() == "new"
    served.control("reconcile --none")


def test_several_lines_apply_in_order_until_one_fails(served: Daemon) -> None:
    assert errno_of(lambda: served.control("acquire a x1\nacquire nosuch x2\nacquire b x3")) \
        == errno.ENOENT
    assert state_of(served, "a")[2] == {  # type: ignore[index]
        "x1": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
    assert state_of(served, "b") is None
    served.control("reconcile --none")


WORDS = ["acquire", "release", "reconcile", "expire", "hold-time", "emergency",
         "force-unmount", "reload", "a", "b", "nosuch", "alloc-1", "on", "off", "-1", "1e400",
         "0", "..", "/", "\x00", "é", " ", "\t", "\n", "x" * 300]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=3000),
    st.lists(st.sampled_from(WORDS), max_size=12).map(lambda w: " ".join(w).encode()),
    st.sampled_from([b"\xff" * 70000, b"reload\n" * 10000, b"x" * 200_000, b"\n" * 5000]),
))
def test_junk_never_crashes_and_rejected_changes_nothing(served: Daemon, data: bytes) -> None:
    served.expect("emergency mode")
    served.expect("FORCE-UNMOUNT")
    served.expect("a bare .reconcile. releases every allocation")
    before = served.status()

    def write() -> None:
        fd = os.open(served.mountpoint / ".control", os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    try:
        write()
        code = 0
    except OSError as exc:
        code = exc.errno or -1
    assert code in (0, errno.EINVAL, errno.ENOENT, errno.EPERM, errno.EIO)
    if code == errno.EINVAL:
        after = served.status()
        for doc in (before, after):
            # An idle image (refcount 0) may be unmounted by its hold timer (hold time 0 here)
            # between the two reads: that is no change of the command's.
            doc["mounts"] = [m for m in doc["mounts"] if m["refcount"]]
            for m in doc["mounts"]:
                m.pop("hold_remaining")
        assert after == before
    assert served.process is not None
    assert served.process.poll() is None
    assert (served.mountpoint / "b/f").read_text() == "bbb"
    if code != errno.EINVAL:
        # Valid commands may have acquired an image ("acquire a alloc-1"): the next example,
        # and the stop at the end, start from nothing acquired.
        served.control("emergency off")
        served.control("reconcile --none")


def test_daemon_survives_a_storm_of_control_writes(served: Daemon) -> None:
    procs = [subprocess.Popen(
        ["sh", "-c", f"for i in $(seq 50); do echo 'acquire a w{n}' > {served.mountpoint}/.control;"
                     f" echo 'release w{n}' > {served.mountpoint}/.control; "
                     f"echo junk > {served.mountpoint}/.control 2>/dev/null; done"])
        for n in range(8)]
    deadline = time.monotonic() + 120
    for p in procs:
        p.wait(max(1, deadline - time.monotonic()))
    m = served.mount_status("a")
    assert m is not None
    assert (m["state"], m["refcount"]) == ("holding", 0)
