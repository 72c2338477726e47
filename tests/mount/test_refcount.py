"""Allocations, refcounts and the hold timer through a real mount (invariants WI2 and WI3 of
docs/interface.md: refcount == allocations using the image; unmount after the hold time)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uenvfs.kernel import mountinfo

from ..support import (
    Daemon,
    build_image,
    errno_of,
    loops_for,
    release_holder,
    run_in,
    spawn_holder,
    wait_until,
)

pytestmark = pytest.mark.fuse


def allocations(daemon: Daemon, name: str) -> dict[str, dict[str, object]]:
    status = daemon.mount_status(name)
    assert status is not None, f"{name} not in .status"
    result: dict[str, dict[str, object]] = status["allocations"]
    return result


def test_two_allocations_then_hold_then_unmount_then_remount(daemon: Daemon) -> None:
    daemon.hold_time = 1.0
    daemon.image("img", {"a": "A", "b": "B"})
    daemon.start()
    image = daemon.mountpoint / "img"
    h1 = spawn_holder(image / "a", alloc="alloc-1")
    h2 = spawn_holder(image / "a", alloc="alloc-2")
    h3 = spawn_holder(image / "b", alloc="alloc-2")
    status = daemon.mount_status("img")
    assert status is not None
    assert (status["state"], status["refcount"]) == ("mounted", 2)
    assert status["allocations"] == {
        "alloc-1": {"opens": 1, "acquired": False, "cwd": 0, "namespaces": 0},
        "alloc-2": {"opens": 2, "acquired": False, "cwd": 0, "namespaces": 0}}
    assert status["hold_remaining"] is None
    release_holder(h1)
    status = daemon.mount_status("img")
    assert status is not None
    assert (status["refcount"], list(status["allocations"])) == (1, ["alloc-2"])
    release_holder(h2)
    assert daemon.mount_status("img")["allocations"] == {  # type: ignore[index]
        "alloc-2": {"opens": 1, "acquired": False, "cwd": 0, "namespaces": 0}}
    release_holder(h3)
    status = daemon.mount_status("img")
    assert status is not None
    assert (status["state"], status["refcount"]) == ("holding", 0)
    assert 0 < status["hold_remaining"] <= 1.0
    loop = [e.source for e in mountinfo.read() if e.mount_point.endswith("/state/mnt/img")]
    assert len(loop) == 1
    assert loop[0].startswith("/dev/loop")
    wait_until(lambda: not daemon.backing_mounted("img"), what="the hold timer to unmount")
    assert daemon.mount_status("img") is None
    wait_until(lambda: not loops_for(daemon.images), what="the loop device to be detached")
    assert (image / "b").read_text() == "B"  # the next access mounts again
    assert daemon.backing_mounted("img")


def test_shell_in_the_image_survives_a_force_unmount_and_remount(daemon: Daemon) -> None:
    # A shell sitting in an image keeps it mounted (see test_cwd.py); only a force-unmount
    # takes it away, and the shell's next access mounts it again.
    daemon.hold_time = 0.5
    daemon.image("img", {"a": "first\n", "sub/c": "deep\n"})
    daemon.expect("FORCE-UNMOUNT")
    daemon.expect("emergency mode ON")
    daemon.start()
    flag = daemon.root / "wait"
    flag.touch()
    script = (f"cd {daemon.mountpoint}/img/sub && cat c && "
              f"while [ -e {flag} ]; do sleep 0.05; done && cat c && ls .. && /bin/pwd")
    with subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True) as shell:
        try:
            # The shell and its `sleep` children sit there.
            wait_until(lambda: [u["cwd"] > 0 for u in (daemon.mount_status("img") or {
                "allocations": {}})["allocations"].values()] == [True], what="the shell to count")
            time.sleep(1.0)  # two hold times
            assert daemon.backing_mounted("img")
            daemon.control("emergency on")
            daemon.control("force-unmount img")
            assert not daemon.backing_mounted("img")
            flag.unlink()
            out, _ = shell.communicate(timeout=30)
        finally:
            shell.kill()
    assert shell.returncode == 0
    assert out == f"deep\ndeep\na\nsub\n{daemon.mountpoint}/img/sub\n"
    assert daemon.backing_mounted("img")


def test_running_executables_and_mappings_count_until_they_end(daemon: Daemon) -> None:
    sleep_binary = Path(shutil.which("sleep") or "/bin/sleep").read_bytes()
    src = {"bin/sleep": sleep_binary, "data.bin": b"x" * 65536}
    build_image(daemon.images / "tools.sqfs", src, mode=0o755)
    daemon.start()
    image = daemon.mountpoint / "tools"
    env = {**os.environ, "PACT_ALLOCATION_ID": "exec-alloc"}
    job = subprocess.Popen([str(image / "bin/sleep"), "2"], env=env)
    time.sleep(0.5)
    # The process closed nothing: the kernel holds the executable open while it runs.
    assert "exec-alloc" in allocations(daemon, "tools")
    job.wait(10)
    wait_until(lambda: "exec-alloc" not in allocations(daemon, "tools"),
               what="the release of the executable")
    # A mapping outlives the file descriptor it was made from.
    with (image / "data.bin").open("rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    assert mapping[:1] == b"x"
    me = f"uid-{os.getuid()}"
    assert allocations(daemon, "tools")[me]["opens"] == 1
    mapping.close()
    wait_until(lambda: me not in allocations(daemon, "tools"), what="release after munmap")


def test_replaced_image_file_serves_the_new_content(daemon: Daemon) -> None:
    path = daemon.image("img", {"file": "old content\n", "only-old": "x", "dir/f": "1"})
    daemon.start()
    image = daemon.mountpoint / "img"
    assert (image / "file").read_text() == "old content\n"
    assert (image / "dir/f").read_text() == "1"
    old_ino = os.stat(image / "file").st_ino
    daemon.control("expire img")
    assert not daemon.backing_mounted("img")
    # Replaced in place, as a site's image sync would (rename over it).
    new = build_image(daemon.root / "new.sqfs", {"file": "NEW, longer content\n", "dir/f": "2",
                                                 "only-new": "y"})
    os.rename(new, path)
    assert (image / "file").read_text() == "NEW, longer content\n"
    assert os.stat(image / "file").st_size == len("NEW, longer content\n")
    assert os.stat(image / "file").st_ino != old_ino
    assert (image / "dir/f").read_text() == "2"
    assert sorted(os.listdir(image)) == ["dir", "file", "only-new"]
    assert not (image / "only-old").exists()


def test_uid_fallback_and_environment_order(daemon: Daemon) -> None:
    daemon.image("img", {"a": "A"})
    daemon.start()
    image = daemon.mountpoint / "img"
    holders = [
        spawn_holder(image / "a", extra_env={"SLURM_JOB_ID": "4242"}),
        spawn_holder(image / "a", alloc="pact-1", extra_env={"SLURM_JOB_ID": "4343"}),
        spawn_holder(image / "a"),
    ]
    try:
        assert set(allocations(daemon, "img")) == {"slurm-4242", "pact-1",
                                                   f"uid-{os.getuid()}"}
    finally:
        for holder in holders:
            release_holder(holder)


@pytest.fixture
def pact_cgroup() -> Iterator[Path]:
    """A real cgroup named like pact's: workload.slice/alloc-42.scope in the cgroup2 tree."""
    roots = [e.mount_point for e in mountinfo.read() if e.fstype == "cgroup2"]
    if not roots:
        pytest.skip("no cgroup2 hierarchy is mounted on this machine")
    scope = Path(roots[0]) / "workload.slice" / "alloc-42.scope"
    try:
        scope.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup here: {exc}")
    yield scope
    for d in (scope, scope.parent):
        for _ in range(50):
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_process_in_a_pact_cgroup_counts_for_its_allocation(
    daemon: Daemon, pact_cgroup: Path
) -> None:
    daemon.image("img", {"a": "A"})
    daemon.start()
    code = ("import sys, json; f = open(sys.argv[1], 'rb'); "
            "print(json.dumps(open('/proc/self/cgroup').read()), flush=True); sys.stdin.read()")
    script = f'echo $$ > {pact_cgroup}/cgroup.procs && exec "$0" "$@"'
    holder = subprocess.Popen(["sh", "-c", script, sys.executable, "-c", code,
                               str(daemon.mountpoint / "img/a")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PACT_ALLOCATION_ID": "not-this-one"})
    assert holder.stdout is not None
    cgroup = holder.stdout.readline()
    try:
        assert "/workload.slice/alloc-42.scope" in cgroup
        assert list(allocations(daemon, "img")) == ["alloc-42"]
    finally:
        release_holder(holder)


def test_status_command_table_and_json(daemon: Daemon) -> None:
    daemon.image("img", {"a": "A"})
    daemon.start()
    holder = spawn_holder(daemon.mountpoint / "img/a", alloc="alloc-7")
    try:
        table = daemon.cli("status")
        assert table.returncode == 0, table.stderr
        assert "img" in table.stdout
        assert "mounted" in table.stdout
        assert "alloc-7(1)" in table.stdout
        as_json = daemon.cli("status", "--json")
        document = json.loads(as_json.stdout)
        assert document == daemon.status() | {"mounts": document["mounts"]}
        assert document["mounts"][0]["allocations"] == {
            "alloc-7": {"opens": 1, "acquired": False, "cwd": 0, "namespaces": 0}}
    finally:
        release_holder(holder)
    gone = run_in("/", f"{sys.executable} -m uenvfs status --mountpoint /nonexistent")
    assert gone.returncode == 3
    assert "no uenvfs serving at /nonexistent" in gone.stderr


def test_metrics_file_in_prometheus_format(daemon: Daemon) -> None:
    daemon.image("img", {"a": "A"})
    (daemon.images / "bad.sqfs").write_bytes(b"not squashfs at all" * 100)
    daemon.expect("bad: mount failed")
    daemon.start()
    holder = spawn_holder(daemon.mountpoint / "img/a", alloc="alloc-7")
    assert errno_of(lambda: os.listdir(daemon.mountpoint / "bad")) == errno.EIO
    try:
        text = (daemon.mountpoint / ".metrics").read_text()
    finally:
        release_holder(holder)
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value)
    assert samples['uenvfs_images{state="mounted"}'] == 1
    assert samples['uenvfs_images{state="failed"}'] == 1
    assert samples['uenvfs_refcount{image="img"}'] == 1
    assert samples['uenvfs_mount_attempts_total{image="img"}'] == 1
    assert samples['uenvfs_mount_failures_total{image="bad"}'] == 1
    assert samples["uenvfs_images_available"] == 2
    assert samples["uenvfs_mount_seconds_count"] == 1
    assert samples['uenvfs_fuse_requests_total{op="open"}'] >= 2
    cli = daemon.cli("metrics")
    assert cli.returncode == 0
    assert "uenvfs_mount_seconds_bucket" in cli.stdout
