"""The configuration: file, flags, defaults, and the errors for values that cannot be used."""

from __future__ import annotations

from pathlib import Path

import pytest

from uenvfs import config
from uenvfs.config import Config, ConfigError


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
])
def test_a_bad_value_is_refused_with_its_reason(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(write(tmp_path, text + "\n"))


def test_a_missing_file_given_by_name_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        config.load(tmp_path / "absent.toml")
