"""Crash and restart (invariant WI6 of docs/interface.md: the state is rebuilt from the mount
table, the journal and the processes): kill -9, start again, nothing lost, nothing leaked."""

from __future__ import annotations

import errno
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from ..conftest import DaemonFactory
from ..support import (
    Daemon,
    errno_of,
    loop_count,
    loops_for,
    release_holder,
    spawn_holder,
    wait_until,
)

pytestmark = pytest.mark.fuse


def backing_names(daemon: Daemon) -> Counter[str]:
    return Counter(Path(e.mount_point).name for e in daemon.backing_mounts())


def restart(make_daemon: DaemonFactory, old: Daemon, **kwargs: object) -> Daemon:
    """A new daemon process on the same directories as *old* (which was killed)."""
    new = make_daemon(root=old.root, hold_time=kwargs.pop("hold_time", old.hold_time))
    new.expected = old.expected
    old.allow_leftovers = True  # its mounts were handed over, on purpose
    return new.start()


def test_kill_9_then_restart_restores_everything(make_daemon: DaemonFactory) -> None:
    first = make_daemon(hold_time=4.0)
    loops_at_start = loop_count(first.root)
    for name in ("x", "y", "z"):
        first.image(name, {"f": name})
    first.expect("clearing a FUSE mount left at")
    first.start()
    first.control("acquire x alloc-1")
    first.control("acquire y alloc-2")
    holder = spawn_holder(first.mountpoint / "z/f", alloc="alloc-3")
    assert backing_names(first) == Counter({"x": 1, "y": 1, "z": 1})
    loops_before_kill = loop_count(first.root)
    assert loops_before_kill == loops_at_start + 3
    first.kill()
    release_holder(holder)

    second = restart(make_daemon, first)
    status = {m["name"]: m for m in second.status()["mounts"]}
    assert sorted(status) == ["x", "y", "z"]
    assert status["x"]["allocations"] == {
        "alloc-1": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
    assert status["y"]["allocations"] == {
        "alloc-2": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
    assert (status["z"]["state"], status["z"]["refcount"]) == ("holding", 0)
    assert status["x"]["image_path"] == str(second.images / "x.sqfs")
    assert backing_names(second) == Counter({"x": 1, "y": 1, "z": 1})  # none mounted twice
    assert loop_count(first.root) == loops_before_kill
    log = second.log()
    # (z may be "not in the journal": a mount is journaled a moment after it is made; the
    # mount table is what proves it, and that is enough to adopt it.)
    assert "start-up recovery: adopted 3 backing mounts" in log
    assert "2 acquisitions restored" in log
    for name in ("x", "y", "z"):
        assert (second.mountpoint / name / "f").read_text() == name
    assert backing_names(second) == Counter({"x": 1, "y": 1, "z": 1})

    second.control("reconcile alloc-2")
    status = {m["name"]: m for m in second.status()["mounts"]}
    assert status["x"]["refcount"] == 0
    assert status["y"]["allocations"] == {
        "alloc-2": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
    second.control("release alloc-2")
    wait_until(lambda: not second.backing_mounts(), what="every hold timer to run out")
    wait_until(lambda: loop_count(first.root) == loops_at_start,
               what="the loop devices to be detached")
    journal = second.state_dir / "journal.json"
    wait_until(lambda: json.loads(journal.read_text())["mounts"] == {},
               what="the journal to record the unmounts")


@pytest.mark.parametrize("damage", ["truncated", "random", "ghost"])
def test_damaged_journal_never_stops_the_daemon(make_daemon: DaemonFactory, damage: str) -> None:
    first = make_daemon()
    first.image("x", {"f": "x"})
    first.expect("clearing a FUSE mount left at")
    first.expect("journal .* unreadable")
    first.start()
    first.control("acquire x alloc-1")
    first.kill()
    journal = first.state_dir / "journal.json"
    whole = journal.read_bytes()
    if damage == "truncated":
        journal.write_bytes(whole[: len(whole) // 2])
    elif damage == "random":
        journal.write_bytes(os.urandom(len(whole)))
    else:
        data = json.loads(whole)
        data["mounts"]["ghost"] = dict(data["mounts"]["x"], backing="/nonexistent/ghost",
                                       acquired=["alloc-9"])
        journal.write_text(json.dumps(data))
    second = restart(make_daemon, first)
    log = second.log()
    status = {m["name"]: m for m in second.status()["mounts"]}
    assert list(status) == ["x"]  # adopted from the mount table in every case
    if damage == "ghost":
        assert "ghost: in the journal but no longer mounted; dropped" in log
        assert status["x"]["allocations"] == {
            "alloc-1": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
    else:
        assert "unreadable" in log
        assert "recovering from the mount table alone" in log
        assert status["x"]["refcount"] == 0  # the journal's acquisitions are lost with it
        assert "1 not in the journal (x)" in log
    assert (second.mountpoint / "x/f").read_text() == "x"
    assert backing_names(second) == Counter({"x": 1})
    second.control("reconcile --none")


def test_ten_kill_restart_cycles_leak_nothing(make_daemon: DaemonFactory) -> None:
    names = ("p", "q", "r")
    daemon = make_daemon(hold_time=300.0)
    loops_at_start = loop_count(daemon.root)
    for name in names:
        daemon.image(name, {"lib/data": name * 1000})
    daemon.expect("clearing a FUSE mount left at")
    daemon.start()
    for cycle in range(10):
        holders = [spawn_holder(daemon.mountpoint / n / "lib/data", alloc=f"job-{cycle}")
                   for n in names[: 1 + cycle % 3]]
        daemon.control(f"acquire {names[cycle % 3]} prolog-{cycle}")
        for name in names:
            assert (daemon.mountpoint / name / "lib/data").read_text() == name * 1000
        assert backing_names(daemon) == Counter(dict.fromkeys(names, 1)), cycle
        assert loop_count(daemon.root) == loops_at_start + len(names)
        daemon.kill()
        for holder in holders:
            release_holder(holder)
        daemon = restart(make_daemon, daemon)
    # After the last restart: one mount per image, every image readable.
    assert backing_names(daemon) == Counter(dict.fromkeys(names, 1))
    assert loop_count(daemon.root) == loops_at_start + len(names)
    for name in names:
        assert (daemon.mountpoint / name / "lib/data").read_text() == name * 1000
    status = {m["name"]: m for m in daemon.status()["mounts"]}
    acquired = {n: list(m["allocations"]) for n, m in status.items()}
    assert acquired == {"p": ["prolog-0", "prolog-3", "prolog-6", "prolog-9"],
                        "q": ["prolog-1", "prolog-4", "prolog-7"],
                        "r": ["prolog-2", "prolog-5", "prolog-8"]}
    daemon.control("reconcile --none")
    daemon.control("expire")
    assert daemon.backing_mounts() == []
    wait_until(lambda: loop_count(daemon.root) == loops_at_start,
               what="the loop devices to be detached")
    assert not loops_for(daemon.images)


def test_fuse_mount_gone_under_a_live_daemon(daemon: Daemon) -> None:
    """An operator's `umount -l` of the FUSE mount: the daemon notices and stops cleanly."""
    daemon.image("x", {"f": "x"})
    daemon.start()
    assert (daemon.mountpoint / "x/f").read_text() == "x"
    os.system(f"umount -l {daemon.mountpoint}")
    assert daemon.process is not None
    daemon.process.wait(20)
    assert daemon.process.returncode == 0
    assert "unmounted from outside" in daemon.log()
    assert daemon.backing_mounts() == []
    assert errno_of(lambda: os.listdir(daemon.mountpoint / "x")) == errno.ENOENT


def test_sigterm_keeps_acquired_images_for_the_next_start(make_daemon: DaemonFactory) -> None:
    first = make_daemon()
    first.image("held", {"f": "held"})
    first.image("acquired", {"f": "acquired"})
    first.start()
    holder = spawn_holder(first.mountpoint / "held/f", alloc="job-1")
    first.control("acquire acquired prolog-1")
    assert first.stop() == 0
    release_holder(holder)  # its file died with the FUSE connection
    # An open file does not outlive the daemon; an acquisition does.
    assert backing_names(first) == Counter({"acquired": 1})
    second = restart(make_daemon, first)
    m = second.mount_status("acquired")
    assert m is not None
    assert m["allocations"] == {
        "prolog-1": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
    assert second.mount_status("held") is None
    second.control("reconcile --none")
