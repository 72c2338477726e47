"""Jobs never notice the daemon: a crash of the server (kill -9), of the keeper, or a planned
`uenvfs restart` resumes the same FUSE connection, with every count carried over."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from uenvfs.client import exits

from ..conftest import DaemonFactory
from ..support import (
    Daemon,
    build_image,
    loop_count,
    release_holder,
    spawn_holder,
    wait_until,
)
from .test_hostile import answered, stop_all, storage_that_hangs

pytestmark = pytest.mark.fuse

LIB_C = 'const char *greet(void) { return "hello from the image library"; }\n'
MAIN_C = r"""
#include <stdio.h>
const char *greet(void);
int main(void) {
    char line[64];
    while (fgets(line, sizeof line, stdin)) { printf("%s\n", greet()); fflush(stdout); }
    return 0;
}
"""

# A job that holds a file of the image open and reads it in two halves, with its working
# directory inside the image; between the halves the daemon dies. It reports what it saw.
READER = r"""
import hashlib, json, os, sys
path, half = sys.argv[1], int(sys.argv[2])
os.chdir(os.path.dirname(path))
f = open(path, "rb")
first = f.read(half)
print("ready", flush=True)
sys.stdin.readline()
rest = f.read()
listing = sorted(os.listdir("."))
with open("small") as g:
    small = g.read()
f.close()
print(json.dumps({"sha256": hashlib.sha256(first + rest).hexdigest(), "listing": listing,
                  "small": small}), flush=True)
"""


def build_app(daemon: Daemon) -> bytes:
    """The image `app`: a program linked against a library of the image (found through an
    RPATH into the mount), a 4 MiB data file and a small one. Returns the data."""
    work = daemon.root / "app-build"
    work.mkdir()
    (work / "greet.c").write_text(LIB_C)
    (work / "main.c").write_text(MAIN_C)
    lib = daemon.mountpoint / "app/lib"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(work / "libgreet.so"),
                    str(work / "greet.c")], check=True)
    subprocess.run(["gcc", "-o", str(work / "greet"), str(work / "main.c"), f"-L{work}",
                    "-lgreet", f"-Wl,-rpath,{lib}"], check=True)
    data = os.urandom(4 << 20)
    build_image(daemon.images / "app.sqfs", {
        "bin/greet": (work / "greet").read_bytes(),
        "lib/libgreet.so": (work / "libgreet.so").read_bytes(),
        "d/data": data, "d/small": "small file\n", "d/other": "other\n",
    }, mode=0o755)
    return data


def uses(daemon: Daemon) -> dict[str, Any]:
    return {m["name"]: m["allocations"] for m in daemon.status()["mounts"] if m["allocations"]}


def drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def verified(daemon: Daemon) -> None:
    """Every count equals what a scan of the processes finds."""
    out = daemon.cli("status", "--verify")
    assert (out.returncode, out.stdout) == (0, "every count agrees with the processes\n"), (
        out.stdout + out.stderr)


def test_jobs_notice_no_crash_of_the_server(daemon: Daemon) -> None:
    data = build_app(daemon)
    daemon.start()
    app = daemon.mountpoint / "app"
    env = {**os.environ, "PACT_ALLOCATION_ID": "job-1"}
    reader = subprocess.Popen([sys.executable, "-c", READER, str(app / "d/data"),
                               str(len(data) // 2)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    program = subprocess.Popen([str(app / "bin/greet")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    jobs: list[subprocess.Popen[str]] = [reader, program]
    try:
        assert reader.stdout is not None
        assert reader.stdin is not None
        assert program.stdout is not None
        assert program.stdin is not None
        assert reader.stdout.readline() == "ready\n"
        program.stdin.write("1\n")
        program.stdin.flush()
        assert program.stdout.readline() == "hello from the image library\n"
        before = daemon.status()
        assert before["server"]["resumes"] == 0
        assert uses(daemon)["app"]["job-1"]["cwd"] == 1
        verified(daemon)

        # The keeper is held still, so that the outage lasts while new jobs start.
        os.kill(daemon.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            old = daemon.kill_server()
            wait_until(lambda: _dead(old), what="the server to die")
            during = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=env)
                      for command in (["cat", str(app / "d/small")], ["ls", str(app / "d")],
                                      ["stat", "-c", "%s", str(app / "d/other")])]
            jobs += during
            time.sleep(0.5)
            assert [job.poll() for job in during] == [None] * 3  # waiting, not failing
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
        outputs = [job.communicate(timeout=30) for job in during]
        assert [job.returncode for job in during] == [0, 0, 0], outputs
        assert [out for out, _ in outputs] == ["small file\n", "data\nother\nsmall\n", "6\n"]

        drop_caches()  # the rest of the data comes through the handle opened before the crash
        reader.stdin.write("go\n")
        reader.stdin.flush()
        report = json.loads(reader.stdout.readline())
        assert report == {"sha256": hashlib.sha256(data).hexdigest(),
                          "listing": ["data", "other", "small"], "small": "small file\n"}
        program.stdin.write("2\n")
        program.stdin.flush()
        assert program.stdout.readline() == "hello from the image library\n"
        after = daemon.status()
        assert after["server"]["pid"] != before["server"]["pid"]
        assert after["server"]["resumes"] == 1
        verified(daemon)

        reader.stdin.close()
        reader.wait(30)
        program.stdin.close()
        program.wait(30)
        daemon.wait_idle("app")  # the releases of handles opened before the crash count down
        assert uses(daemon) == {}
        assert " 1 times" in daemon.cli("status").stdout  # the one-line server summary
    finally:
        stop_all(jobs)
        for job in jobs:
            for stream in (job.stdin, job.stdout, job.stderr):
                if stream is not None:
                    stream.close()
    daemon.expect(r"keeper: server pid \d+ was killed by SIGKILL")


def test_twenty_crashes_under_churn(daemon: Daemon) -> None:
    from .test_reliability import (
        expected_uses,
        pause_workers,
        resume_workers,
        start_workers,
        stop_workers,
        wait_for_uses,
    )

    daemon.hold_time = 0.05
    names = [f"img{i}" for i in range(4)]
    for name in names:
        daemon.image(name, {f"d{d}/f{f}": os.urandom(4096) for d in range(4) for f in range(5)})
    loops_before = loop_count(daemon.root)
    daemon.expect(r"keeper: server pid \d+ was killed by SIGKILL")
    daemon.start()
    workers = start_workers(daemon, 16, 4, names)
    pauses = []
    assert daemon.process is not None
    keeper_fds = _fds(daemon.process.pid)
    try:
        for _ in range(20):
            time.sleep(0.3)
            old = daemon.kill_server()
            started = time.monotonic()
            wait_until(functools.partial(_serving_other_than, daemon, old), timeout=30,
                       what="a new server")
            pauses.append(time.monotonic() - started)
        held, sitting = pause_workers(workers)
        wait_for_uses(daemon, expected_uses(held, sitting))
        verified(daemon)
        resume_workers(workers)
    finally:
        results = stop_workers(workers)
    errors = sum(r.get("errors", 0) for r in results)
    assert errors == 0, [r["last_error"] for r in results if r.get("errors")]
    assert sum(r.get("reads", 0) for r in results) > 1000
    assert daemon.status()["server"]["resumes"] == 20
    assert _fds(daemon.process.pid) == keeper_fds  # no descriptor leaked by the keeper
    wait_until(lambda: daemon.backing_mounts() == [], what="every image to unmount at the end")
    wait_until(lambda: loop_count(daemon.root) == loops_before,
               what="every loop device to be detached")
    pauses.sort()
    print(f"20 crashes: new server answering after {pauses[10]:.3f} s (median), "
          f"{pauses[-1]:.3f} s (max)")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _dead(pid: int) -> bool:
    """Gone, or a zombie (its parent, the keeper, may be stopped and not reap it yet)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return text[text.rindex(")") + 2] == "Z"


def _serving_other_than(daemon: Daemon, old: int) -> bool:
    try:
        return daemon.server_pid() != old
    except OSError:
        return False


def test_a_crash_in_the_middle_of_a_mount_and_of_a_command(daemon: Daemon) -> None:
    with storage_that_hangs(daemon, {"f": "slow"}) as storage:
        daemon.config = "mount_timeout = 60\n"
        daemon.expect(r"keeper: server pid \d+ was killed by SIGKILL")
        daemon.start()
        loops_before = loop_count(daemon.root)
        storage.send_signal(signal.SIGSTOP)
        try:
            # The command waits for the mount, which waits for the storage.
            acquire = subprocess.Popen(
                [sys.executable, "-m", "uenvfs", "acquire", "slow", "job-1", "--mountpoint",
                 str(daemon.mountpoint)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            reader = subprocess.Popen(["cat", str(daemon.mountpoint / "slow/f")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
            assert (acquire.poll(), reader.poll()) == (None, None)
            daemon.kill_server()
            wait_until(lambda: " resumed " in daemon.log(), what="a new server")
            assert answered(["cat", str(daemon.mountpoint / "local/f")]) == "local"
        finally:
            storage.send_signal(signal.SIGCONT)
        try:
            out, err = acquire.communicate(timeout=60)
        except Exception:
            print(daemon.log())
            raise
        assert (acquire.returncode, out, err) == (0, "", "")
        out, err = reader.communicate(timeout=60)
        assert (reader.returncode, out, err) == (0, "slow", "")
        status = daemon.mount_status("slow")
        assert status is not None
        assert status["allocations"] == {
            "job-1": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
        assert [e.mount_point for e in daemon.backing_mounts()].count(
            str(daemon.backing_root / "slow")) == 1
        daemon.control("release job-1")
        daemon.control("expire")
        wait_until(lambda: loop_count(daemon.root) == loops_before,
                   what="no loop device left over")


def test_a_killed_keeper_is_replaced(daemon: Daemon) -> None:
    daemon.image("img", {"f": "kept"})
    daemon.expect(r"the keeper died: starting another")
    daemon.expect(r"keeper: server pid \d+ exited \(status unknown: not our child\)")
    daemon.start()
    assert daemon.process is not None
    holder = open(daemon.mountpoint / "img/f")  # noqa: SIM115
    try:
        server = daemon.server_pid()
        os.kill(daemon.process.pid, signal.SIGKILL)
        daemon.process.wait()
        wait_until(lambda: len(_keepers(daemon)) == 1, what="a new keeper")
        assert (daemon.mountpoint / "img/f").read_text() == "kept"
        daemon.kill_server()
        wait_until(lambda: _serving_other_than(daemon, server), what="a new server")
        assert holder.read() == "kept"
        assert (daemon.mountpoint / "img/f").read_text() == "kept"
    finally:
        holder.close()
    daemon.wait_idle("img")
    keeper = _keepers(daemon)[0]
    os.kill(keeper, signal.SIGTERM)
    wait_until(lambda: not daemon.processes_left(), what="the keeper and its server to stop")
    assert not (daemon.mountpoint / "img").exists()  # unmounted: the connection ended


def _keepers(daemon: Daemon) -> list[int]:
    return [pid for pid in daemon.processes_left()
            if b"uenvfs.keeper" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_restart_carries_every_count_and_timer_over(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(hold_time=300.0)
    daemon.image("held", {"f": "held"})
    daemon.image("idle", {"f": "idle"})
    daemon.image("acq", {"f": "acq"})
    (daemon.images / "broken.sqfs").write_bytes(b"not an image" * 100)
    daemon.expect(r"broken: mount failed")
    daemon.expect(r"emergency mode ON")
    daemon.start()
    daemon.control("hold-time 120 idle")
    daemon.control("acquire acq job-9")
    daemon.control("emergency on")
    assert (daemon.mountpoint / "idle/f").read_text() == "idle"
    with pytest.raises(OSError, match="Input/output error"):
        (daemon.mountpoint / "broken/f").read_text()
    env = {**os.environ, "PACT_ALLOCATION_ID": "job-1"}
    sitter = subprocess.Popen(["sleep", "600"], cwd=daemon.mountpoint / "held", env=env)
    holder = open(daemon.mountpoint / "held/f")  # noqa: SIM115
    try:
        time.sleep(0.5)
        before = daemon.status()
        assert daemon.process is not None
        keeper_fds = _fds(daemon.process.pid)
        out = daemon.cli("restart")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"restarted: server pid {before['server']['pid']} ")
        after = daemon.status()
        assert after["server"]["pid"] != before["server"]["pid"]
        assert after["server"]["resumes"] == 1
        assert after["emergency"] is True
        was = {m["name"]: m for m in before["mounts"]}
        now = {m["name"]: m for m in after["mounts"]}
        assert sorted(now) == sorted(was) == ["acq", "broken", "held", "idle"]
        for name in was:
            assert now[name]["allocations"] == was[name]["allocations"], name
            assert now[name]["state"] == was[name]["state"], name
            assert now[name]["error"] == was[name]["error"], name
        # The hold timer ran on: less time left, by about the time that passed.
        left_before, left_after = was["idle"]["hold_remaining"], now["idle"]["hold_remaining"]
        assert 0 <= left_before - left_after < 10, (left_before, left_after)
        assert left_after > 100  # the per-image hold time (120 s), not the global one (300)
        assert holder.read() == "held"
        verified(daemon)
        for _ in range(3):  # again and again: the keeper (same pid) holds no more than before
            assert daemon.cli("restart").returncode == 0
        assert daemon.status()["server"]["resumes"] == 4
        assert _fds(daemon.process.pid) == keeper_fds
        assert uses(daemon) == {m: a for m, a in (
            (m["name"], m["allocations"]) for m in before["mounts"]) if a}
    finally:
        holder.close()
        sitter.kill()
        sitter.wait()
    daemon.control("release job-9")
    daemon.control("emergency off")


def test_restart_while_images_are_mounting(daemon: Daemon) -> None:
    with storage_that_hangs(daemon, {"f": "slow"}) as storage:
        daemon.config = "mount_timeout = 60\n"
        daemon.expect(r"requests still under way after")
        daemon.start()
        loops_before = loop_count(daemon.root)
        storage.send_signal(signal.SIGSTOP)
        try:
            reader = subprocess.Popen(["cat", str(daemon.mountpoint / "slow/f")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
            result: dict[str, subprocess.CompletedProcess[str]] = {}
            restart = threading.Thread(target=lambda: result.update(out=daemon.cli("restart")))
            restart.start()
            restart.join(60)
            assert result["out"].returncode == 0, result["out"].stderr
            assert answered(["cat", str(daemon.mountpoint / "local/f")]) == "local"
            assert reader.poll() is None
        finally:
            storage.send_signal(signal.SIGCONT)
        out, err = reader.communicate(timeout=60)
        assert (reader.returncode, out, err) == (0, "slow", "")
        daemon.wait_idle("slow")
        daemon.control("expire")
        wait_until(lambda: loop_count(daemon.root) == loops_before,
                   what="no loop device left over")


def test_a_restart_that_cannot_start_changes_nothing(daemon: Daemon) -> None:
    daemon.image("img", {"f": "served on"})
    daemon.start()
    holder = spawn_holder(daemon.mountpoint / "img/f", alloc="job-1")
    try:
        before = daemon.status()["server"]
        (daemon.root / "uenvfs.toml").write_text('storage_guard = "bogus"\n')  # read at start
        daemon.expect(r"restart failed: the new server \(pid \d+\) exited with status 2")
        daemon.expect(r"storage_guard must be one of")
        out = daemon.cli("restart")
        assert out.returncode == exits.FAILED
        assert "restart failed: " in out.stderr
        assert "exited with status 2 before it took over" in out.stderr
        after = daemon.status()
        assert after["server"]["pid"] == before["pid"]
        assert "exited with status 2" in after["server"]["restart_error"]
        assert after["mounts"][0]["allocations"] == {
            "job-1": {"opens": 1, "acquired": False, "cwd": 0, "namespaces": 0}}
        assert (daemon.mountpoint / "img/f").read_text() == "served on"
        (daemon.root / "uenvfs.toml").write_text("")
        assert daemon.cli("restart").returncode == 0
        assert daemon.status()["server"]["pid"] != before["pid"]
    finally:
        release_holder(holder)
