"""What an operator changes outlives the server: the configuration file is read again by
`reload` (SIGHUP), and hold times and emergency mode set by command survive a crash and a
stop (the journal)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ..conftest import DaemonFactory
from ..support import Daemon, build_image, errno_of, wait_until

pytestmark = pytest.mark.fuse


def hold_left(daemon: Daemon, name: str) -> float:
    found = daemon.mount_status(name)
    assert found is not None
    assert found["state"] == "holding", found
    left: float = found["hold_remaining"]
    return left


def again(make_daemon: DaemonFactory, old: Daemon) -> Daemon:
    """A new `uenvfs serve` on *old*'s directories, with the same flags (--hold-time 60)."""
    new = make_daemon(root=old.root, hold_time=old.hold_time)
    new.expected = old.expected
    old.allow_leftovers = True  # the images it left mounted are the new one's
    return new.start()


def test_hold_times_and_emergency_survive_a_crash_and_a_stop(make_daemon: DaemonFactory) -> None:
    first = make_daemon(hold_time=60.0)
    first.image("a", {"f": "a"})
    first.image("b", {"f": "b"})
    first.expect("emergency mode ON")
    first.expect("clearing a FUSE mount left at")
    first.start()
    first.control("hold-time 300")
    first.control("hold-time 900 a")
    first.control("emergency on")
    assert (first.mountpoint / "a/f").read_text() == "a"
    assert (first.mountpoint / "b/f").read_text() == "b"
    first.kill()  # keeper and server: the connection ends, the journal stays

    second = again(make_daemon, first)
    status = second.status()
    assert (status["hold_time"], status["emergency"]) == (300.0, True)  # not the flag's 60
    assert 300 < hold_left(second, "a") <= 900
    assert 60 < hold_left(second, "b") <= 300
    assert [second.mount_status(n)["hold_time"] for n in "ab"] == [900.0, 300.0]  # type: ignore[index]
    assert "hold time 300 s, as set by hold-time before the restart (configured: 60 s)" in (
        second.log())
    assert "hold times of single images, as set before the restart: a 900 s" in second.log()
    assert second.stop() == 0  # a clean stop unmounts the idle images; the settings stay

    third = again(make_daemon, second)
    assert (third.status()["hold_time"], third.status()["emergency"]) == (300.0, True)
    (third.mountpoint / "a/f").read_text()
    assert 300 < hold_left(third, "a") <= 900
    third.control("emergency off")
    third.control("expire")
    assert third.stop() == 0
    fourth = again(make_daemon, third)
    assert fourth.status()["emergency"] is False


def test_reload_reads_the_configuration_file_again(make_daemon: DaemonFactory,
                                                    tmp_path: Path) -> None:
    daemon = make_daemon(hold_time=None, log_level_flag=False)
    daemon.image("a", {"f": "a"})
    elsewhere = tmp_path / "more"
    elsewhere.mkdir()
    build_image(elsewhere / "m.sqfs", {"f": "from the map"})
    map_file = daemon.root / "site.map"
    map_file.write_text(f"m {elsewhere / 'm.sqfs'}\n")
    daemon.config = "hold_time = 60\nlinger_us = 100\n"
    daemon.expect("reload: configuration changes that take a new server")
    daemon.expect("reload: configuration changes that take a stop and start")
    daemon.start()
    config = daemon.root / "uenvfs.toml"
    assert daemon.status()["hold_time"] == 60.0
    assert errno_of(lambda: (daemon.mountpoint / "m/f").read_text()) == 2  # ENOENT

    daemon.control("hold-time 5")  # set by command: a reload that leaves hold_time keeps it
    config.write_text(f'hold_time = 60\nlinger_us = 100\nmaps = ["{map_file}"]\n')
    daemon.control("reload")
    assert daemon.status()["hold_time"] == 5.0
    assert (daemon.mountpoint / "m/f").read_text() == "from the map"
    assert f"configuration applied: maps: [] -> [{map_file}]" in daemon.log()

    # A changed hold time replaces the one set by command; what takes a restart is logged.
    config.write_text(f'hold_time = 20\nlinger_us = 0\nread_ahead_kb = 128\n'
                      f'maps = ["{map_file}"]\nlog_level = "DEBUG"\n')
    assert daemon.cli("reload").returncode == 0
    assert daemon.status()["hold_time"] == 20.0
    log = daemon.log()
    assert "configuration applied: hold_time: 60.0 -> 20.0; log_level: INFO -> DEBUG" in log
    assert "the configured hold time replaces the one set by hold-time (5 s)" in log
    assert ("changes that take a new server (uenvfs restart, or systemctl reload uenvfs): "
            "linger_us: 100 -> 0") in log
    assert "take a stop and start of uenvfs (it unmounts: release every image first): " \
           "read_ahead_kb: 1024 -> 128" in log
    (daemon.mountpoint / "a/f").read_text()
    wait_until(lambda: " DEBUG " in daemon.log(), what="DEBUG lines after log_level = DEBUG")

    # A configuration that cannot be used changes nothing, and says why.
    daemon.expect("reload.*hold_time must be a number")
    config.write_text('hold_time = "soon"\n')
    assert errno_of(lambda: daemon.control("reload")) == 22  # EINVAL
    refused = daemon.cli("reload")
    assert refused.returncode == 1
    assert "Invalid argument" in refused.stderr
    assert daemon.status()["hold_time"] == 20.0
    assert (daemon.mountpoint / "m/f").read_text() == "from the map"

    # SIGHUP (to the keeper, as systemd's kill would) does the same as `reload`.
    config.write_text(f'hold_time = 7\nmaps = ["{map_file}"]\n')
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.status()["hold_time"] == 7.0, what="SIGHUP to apply hold_time")


def test_restart_applies_the_file_and_refuses_what_takes_a_stop(
    make_daemon: DaemonFactory,
) -> None:
    """`uenvfs restart` (systemctl reload) starts a server that reads the file anew."""
    daemon = make_daemon(hold_time=None)
    daemon.image("a", {"f": "a"})
    daemon.config = "hold_time = 60\n"
    daemon.start()
    config = daemon.root / "uenvfs.toml"
    daemon.control("hold-time 5")
    assert daemon.cli("restart").returncode == 0
    assert daemon.status()["hold_time"] == 5.0  # set by command, the file unchanged
    config.write_text("hold_time = 9\nlinger_us = 50\n")
    first = daemon.server_pid()
    assert daemon.cli("restart").returncode == 0
    assert daemon.server_pid() != first
    assert daemon.status()["hold_time"] == 9.0  # the file changed it: as a reload would
    log = daemon.log()
    assert "restart: configuration now in force: hold_time: 60.0 -> 9.0; linger_us: 100 -> 50" \
        in log
    assert "hold time 9 s, as configured now (hold-time had set 5 s when 60 s was configured)" \
        in log
    # The readahead is set once per connection, at its start: a restart is refused.
    daemon.expect("restart.*only a stop and start of uenvfs can: read_ahead_kb: 1024 -> 64")
    config.write_text("hold_time = 9\nlinger_us = 50\nread_ahead_kb = 64\n")
    pid = daemon.server_pid()
    refused = daemon.cli("restart")
    assert refused.returncode == 1
    assert "Invalid argument" in refused.stderr
    assert daemon.server_pid() == pid
    assert (daemon.mountpoint / "a/f").read_text() == "a"
