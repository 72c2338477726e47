"""The configuration: file, flags, defaults, and the errors for values that cannot be used."""

from __future__ import annotations

from pathlib import Path

import pytest

from uenvfs.core import config
from uenvfs.core.config import Config, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "uenvfs.toml"
    path.write_text(text)
    return path


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "")) == Config()


def test_file_values_and_flags_beat_the_defaults_in_that_order(tmp_path: Path) -> None:
    path = write(tmp_path, 'hold_time = 30\nlinger_us = 0\nread_ahead_kb = 128\n'
                           'images = "/srv/images"\nvalidate = false\n')
    loaded = config.load(path, {"hold_time": 5.0, "backend": None})
    assert loaded.hold_time == 5.0  # the flag
    assert loaded.linger_us == 0
    assert loaded.read_ahead_kb == 128
    assert not loaded.validate
    assert loaded.images == (Path("/srv/images"),)
    assert loaded.backend == "auto"  # a flag that was not given changes nothing


@pytest.mark.parametrize(("text", "message"), [
    ("linger_us = -1", "linger_us must be a number of microseconds from 0 to 10000"),
    ("linger_us = 20000", "linger_us must be a number of microseconds from 0 to 10000"),
    ("linger_us = 1.5", "linger_us must be a number of microseconds"),
    ("linger_us = true", "linger_us must be a number of microseconds"),
    ("read_ahead_kb = -4", "read_ahead_kb must be a number of KiB from 0 to 65536"),
    ("validate = 1", "validate must be true or false"),
    ("hold_time = -1", "hold_time must be a finite number >= 0"),
    ("hold_time = 'long'", "hold_time must be a number"),
    ("backend = 'nfs'", "backend must be one of auto, kernel, squashfuse"),
    ("mountpoint = 'relative'", "mountpoint must be an absolute path"),
    ("holdtime = 3", "unknown key 'holdtime'"),
    ("hold_time = ", "Invalid value"),
    ("cgroup_layouts = '/workload.slice/{id}.scope'", "cgroup_layouts must be a list"),
    ("cgroup_layouts = [1]", "cgroup_layouts must be a list of cgroup paths"),
    ("cgroup_layouts = ['workload.slice/{id}.scope']", "must start with /"),
    ("cgroup_layouts = ['/workload.slice/x.scope']", "must name the allocation once"),
    ("cgroup_layouts = ['/a/{id}/{job}']", "must name the allocation once"),
    ("cgroup_layouts = ['/a/{name}']", r"unknown placeholder \{name\}"),
    ("cgroup_layouts = ['/a/../{id}']", r"empty, \. or \.\. component"),
])
def test_a_bad_value_is_refused_with_its_reason(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(write(tmp_path, text + "\n"))


def test_cgroup_layouts_default_to_pact_and_slurm_and_may_be_set(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "")).cgroup_layouts == (
        "/workload.slice/{id}.scope", "/system.slice/slurmstepd.scope/job_{job}",
        "/slurm/uid_{uid}/job_{job}")
    text = "cgroup_layouts = ['/site.slice/alloc_{id}', '/slurm/job_{job}']\n"
    assert config.load(write(tmp_path, text)).cgroup_layouts == (
        "/site.slice/alloc_{id}", "/slurm/job_{job}")
    assert config.load(write(tmp_path, "cgroup_layouts = []\n")).cgroup_layouts == ()


def test_a_missing_file_given_by_name_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        config.load(tmp_path / "absent.toml")


def test_changes_say_what_a_reload_applies_and_what_takes_a_restart(tmp_path: Path) -> None:
    old = config.load(write(tmp_path, 'hold_time = 60\nlinger_us = 100\n'))
    new = config.load(write(tmp_path, 'hold_time = 30\nlinger_us = 0\nmaps = ["/etc/m"]\n'
                                      'read_ahead_kb = 128\nlog_level = "DEBUG"\n'))
    found = config.changes(config.as_json(old), config.as_json(new))
    assert found.live == ("maps: [] -> [/etc/m]", "hold_time: 60.0 -> 30.0",
                          "log_level: INFO -> DEBUG")
    assert found.restart == ("linger_us: 100 -> 0",)
    assert found.connection == ("read_ahead_kb: 1024 -> 128",)
    assert found.keys("live") == ("maps", "hold_time", "log_level")
    applied = config.live_part(old, new)
    assert (applied.hold_time, applied.maps, applied.log_level) == (30.0, (Path("/etc/m"),),
                                                                   "DEBUG")
    assert (applied.linger_us, applied.read_ahead_kb) == (100, 1024)  # not applied live
    # Every key is in exactly one group, and a key an older server did not know is no change.
    assert not set(config.LIVE) & set(config.CONNECTION)
    assert set(config.LIVE) | set(config.CONNECTION) <= set(config.as_json(old))
    assert config.changes({"hold_time": 60.0}, config.as_json(new)).live == (
        "hold_time: 60.0 -> 30.0",)
