"""Defaults, /etc/uenvfs.toml and command-line flags, merged into one frozen `Config`.

Precedence: a flag beats the file, the file beats the built-in default. A key that has a flag
of `uenvfs serve` has its name with `_` for `-` (but `maps` is `--map` and `repos` is
`--repo`, each repeatable); docs/interface.md lists every key. Some of them:

    mountpoint = "/run/pact/uenv"
    images = ["/images"]            # or one string
    maps = ["/etc/uenvfs/site.map"]
    program_map = "/etc/uenvfs/lookup"
    hold_time = 60.0
    state_dir = "/run/pact/uenvfs"
    backend = "auto"                # auto | kernel | squashfuse
    negative_cache = 10.0
    mount_timeout = 30.0
    program_timeout = 10.0
    validate = true                 # check each image version with rdsquashfs before mounting
    read_ahead_kb = 1024            # readahead through the mount (0: the kernel's 128)
    linger_us = 100                 # keep polling for the next request before sleeping (0: no)
    open_files_per_allocation = 0   # open files in images per allocation (0: half the limit)
    open_files_per_uid = 0          # open files in images per uid but root's (0: half the limit)
    handles_per_uid = 16384         # other handles (directories, .status...) per uid but root's
    handles_total = 131072          # other handles in all
    allocations_per_uid = 4096      # allocations the handles of one uid (not root) count for
    storage_guard = "auto"          # auto | always | never: see manager/storage.py
    cgroup_layouts = ["/workload.slice/{id}.scope", ...]  # where a cgroup names an allocation
    log_level = "INFO"
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .. import MOUNTPOINT
from .cgroups import DEFAULT_LAYOUTS, LayoutError, parse_layouts

DEFAULT_CONFIG_FILE = Path("/etc/uenvfs.toml")
DEFAULT_MOUNTPOINT = Path(MOUNTPOINT)
BACKENDS = ("auto", "kernel", "squashfuse")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
GUARD_MODES = ("auto", "always", "never")  # which images' storage is guarded (manager/storage.py)


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Config:
    mountpoint: Path = DEFAULT_MOUNTPOINT
    images: tuple[Path, ...] = (Path("/images"),)
    maps: tuple[Path, ...] = ()
    repos: tuple[Path, ...] = ()  # uenv repositories (index.db, images/<sha256>/)
    system: str | None = None  # the node's system and uarch: which repository records serve
    uarch: str | None = None
    program_map: Path | None = None
    hold_time: float = 60.0
    state_dir: Path = Path("/run/pact/uenvfs")
    backend: str = "auto"
    negative_cache: float = 10.0
    mount_timeout: float = 30.0
    program_timeout: float = 10.0
    validate: bool = True
    read_ahead_kb: int = 1024
    linger_us: int = 100
    open_files_per_allocation: int = 0
    open_files_per_uid: int = 0
    handles_per_uid: int = 16384
    handles_total: int = 131072
    allocations_per_uid: int = 4096
    storage_guard: str = "auto"
    cgroup_layouts: tuple[str, ...] = DEFAULT_LAYOUTS  # see core/cgroups.py
    log_level: str = "INFO"

    @property
    def backing_root(self) -> Path:
        """Where the backing mounts live: `<state-dir>/mnt/<name>`."""
        return self.state_dir / "mnt"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.json"

    @property
    def socket_path(self) -> Path:
        """The query socket (core/queries.py): `<state-dir>/socket`."""
        return self.state_dir / "socket"

    def checked(self) -> Config:
        """This configuration, if every value is usable; else `ConfigError` says which."""
        for name in ("hold_time", "negative_cache", "mount_timeout", "program_timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.storage_guard not in GUARD_MODES:
            raise ConfigError(f"storage_guard must be one of {', '.join(GUARD_MODES)}, "
                              f"not {self.storage_guard!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        for name in ("mountpoint", "state_dir"):
            if not getattr(self, name).is_absolute():
                raise ConfigError(f"{name} must be an absolute path")
        try:
            parse_layouts(self.cgroup_layouts)
        except LayoutError as exc:
            raise ConfigError(f"cgroup_layouts: {exc}") from None
        mp, sd = self.mountpoint, self.state_dir
        if mp == sd or mp in sd.parents or sd in mp.parents:
            # The daemon would stat its own mountpoint when managing its backing mounts.
            raise ConfigError(f"state_dir {sd} and mountpoint {mp} must not contain each other")
        return self


_PATH_LISTS = {"images", "maps", "repos"}
_PATHS = {"mountpoint", "state_dir", "program_map"}
_FLOATS = {"hold_time", "negative_cache", "mount_timeout", "program_timeout"}
_COUNTS = {"handles_per_uid", "handles_total", "allocations_per_uid"}


def _convert(key: str, value: Any) -> Any:
    if key in _PATH_LISTS:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{key} must be a path or a list of paths")
        return tuple(Path(i) for i in items)
    if key in _PATHS:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a path")
        return Path(value)
    if key == "read_ahead_kb":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65536:
            raise ConfigError(f"{key} must be a number of KiB from 0 to 65536")
        return value
    if key == "linger_us":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10_000:
            raise ConfigError(f"{key} must be a number of microseconds from 0 to 10000")
        return value
    if key in ("open_files_per_allocation", "open_files_per_uid"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key} must be a whole number >= 0 (0: automatic)")
        return value
    if key == "cgroup_layouts":
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            raise ConfigError(f"{key} must be a list of cgroup paths")
        return tuple(value)
    if key in _COUNTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a whole number >= 1")
        return value
    if key == "validate":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false")
        return value
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string")
    return value


def load(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The configuration from *path* (default /etc/uenvfs.toml if it exists) and *overrides*.

    *overrides* holds flag values; None means "not given on the command line".
    """
    values: dict[str, Any] = {}
    known = {f.name for f in fields(Config)}
    file = path if path is not None else DEFAULT_CONFIG_FILE
    if path is not None or file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: {exc}") from exc
        for key, value in data.items():
            key = key.replace("-", "_")
            if key not in known:
                raise ConfigError(f"{file}: unknown key {key!r}")
            values[key] = _convert(key, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return replace(Config(), **values).checked()


# -- what a reload can change ------------------------------------------------------------------

# Applied by `reload` (SIGHUP) in the running server.
LIVE = ("images", "maps", "repos", "system", "uarch", "program_map", "hold_time",
        "negative_cache", "mount_timeout", "program_timeout", "log_level")
# Set once per FUSE connection or state directory: a stop and start (which unmounts) applies
# them; every other key takes a new server (`uenvfs restart`, `systemctl reload uenvfs`).
CONNECTION = ("mountpoint", "state_dir", "read_ahead_kb")


def as_json(config: Config) -> dict[str, Any]:
    """*config* as JSON values (paths as strings), e.g. to compare with a later one."""
    values: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, tuple):
            value = [str(v) for v in value]
        elif isinstance(value, Path):
            value = str(value)
        values[f.name] = value
    return values


@dataclass(frozen=True)
class Changes:
    """What changed from one configuration to the next, as `key: old -> new` texts, by what
    applies it."""

    live: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()  # a new server: `uenvfs restart`
    connection: tuple[str, ...] = ()  # a stop and start

    def keys(self, kind: str) -> tuple[str, ...]:
        return tuple(text.split(":", 1)[0] for text in getattr(self, kind))


def changes(old: dict[str, Any], new: dict[str, Any]) -> Changes:
    """The differences of two `as_json` configurations (a key missing from *old*, written by
    an older uenvfs, is no change)."""
    texts: dict[str, list[str]] = {"live": [], "restart": [], "connection": []}
    for key, value in new.items():
        if key not in old or old[key] == value:
            continue
        kind = "live" if key in LIVE else "connection" if key in CONNECTION else "restart"
        texts[kind].append(f"{key}: {_show(old[key])} -> {_show(value)}")
    return Changes(*(tuple(texts[k]) for k in ("live", "restart", "connection")))


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(value) + "]"
    return "none" if value is None else str(value)


def live_part(current: Config, new: Config) -> Config:
    """*current* with the keys that a reload applies taken from *new*."""
    return replace(current, **{key: getattr(new, key) for key in LIVE})
