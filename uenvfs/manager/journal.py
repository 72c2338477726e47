"""The crash-safe journal: every backing mount the daemon made, every acquired allocation,
and the operator's settings made by command.

Written atomically (temp file, fsync, rename, fsync of the directory) whenever it changes, so
that after a crash or a restart the daemon finds its mounts, the allocations that acquired
them, and the hold times and emergency mode set through `.control` (invariant WI6 in
docs/interface.md). The kernel's mount table stays the authority on what is mounted: the
journal only adds what the mount table cannot say (image identity, acquisitions, settings).

    {"version": 1,
     "mounts": {"pytorch-2.5": {"image_path": "/images/pytorch-2.5.sqfs",
                                "backing": "/run/pact/uenvfs/mnt/pytorch-2.5",
                                "identity": [64769, 1234, 104857600, 1732950000000000000],
                                "acquired": ["slurm-7"], "owners": {"slurm-7": 1000},
                                "mounted_at": 1732950000.0}},
     "hold_time": 5.0, "hold_time_configured": 60.0, "hold_times": {"pytorch-2.5": 600.0},
     "emergency": false}

The settings are those of `Settings.record` (core/settings.py): `hold_time` is the global hold
time set by `hold-time SECONDS` (null: the configured one), and `hold_time_configured` the
configured one at that time: if the configuration says otherwise at the next start, the
configuration wins (as at a `reload` that changes it). `hold_times` are those set for single
images. The settings are optional when read, so a journal written by an older uenvfs reads as
"nothing set", and an older uenvfs ignores them. So are `owners` (the uid each acquired
allocation belongs to, where known: core/owners.py): an older journal has none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.model import Mount
from ..core.names import valid_alloc, valid_name
from ..core.owners import MAX_UID, Owners
from ..core.registry import Registry
from ..core.settings import Settings, SettingsRecord

log = logging.getLogger(__name__)

VERSION = 1


class JournalError(Exception):
    """The journal exists but cannot be read: torn, garbage, or of another version."""


@dataclass(frozen=True)
class MountRecord:
    image_path: str
    backing: str
    identity: tuple[int, int, int, int] | None = None
    acquired: tuple[str, ...] = ()
    mounted_at: float | None = None
    owners: Mapping[str, int] = field(default_factory=dict)  # acquired allocation -> uid

    def to_json(self) -> dict[str, Any]:
        return {
            "image_path": self.image_path,
            "backing": self.backing,
            "identity": list(self.identity) if self.identity else None,
            "acquired": sorted(self.acquired),
            "owners": dict(sorted(self.owners.items())),
            "mounted_at": self.mounted_at,
        }


@dataclass(frozen=True)
class Journal:
    mounts: Mapping[str, MountRecord] = field(default_factory=dict)
    settings: SettingsRecord = field(default_factory=SettingsRecord)  # made by command

    def to_json(self) -> dict[str, Any]:
        settings = self.settings
        return {"version": VERSION,
                "mounts": {name: r.to_json() for name, r in sorted(self.mounts.items())},
                "hold_time": settings.hold_time,
                "hold_time_configured": settings.hold_time_configured,
                "hold_times": dict(sorted(settings.hold_times.items())),
                "emergency": settings.emergency}


def snapshot(registry: Registry, mounts: Mapping[str, Mount], settings: Settings,
             owners: Owners) -> Journal:
    """What must survive a crash, as of now: the backing *mounts*, the allocations that
    acquired them with their *owners*, and the settings made by command."""
    records = {}
    for name, mount in mounts.items():
        acquired = tuple(a for a, u in registry[name].users.items() if u.acquired)
        records[name] = MountRecord(str(mount.image_path), str(mount.backing),
                                    mount.version.identity, acquired, mount.mounted_at,
                                    owners.of(acquired))
    return Journal(records, settings.record())


def _record(name: str, raw: Any) -> MountRecord:
    if not valid_name(name) or not isinstance(raw, dict):
        raise JournalError(f"bad entry {name!r}")
    image_path, backing = raw.get("image_path"), raw.get("backing")
    identity, acquired = raw.get("identity"), raw.get("acquired", [])
    mounted_at, owners = raw.get("mounted_at"), raw.get("owners", {})
    if mounted_at is not None and (
        isinstance(mounted_at, bool) or not isinstance(mounted_at, (int, float))
    ):
        raise JournalError(f"{name}: bad mounted_at {mounted_at!r}")
    if not isinstance(image_path, str) or not isinstance(backing, str):
        raise JournalError(f"{name}: image_path and backing must be strings")
    if identity is not None and not (
        isinstance(identity, list) and len(identity) == 4
        and all(isinstance(i, int) and not isinstance(i, bool) for i in identity)
    ):
        raise JournalError(f"{name}: bad identity {identity!r}")
    if not isinstance(acquired, list) or not all(
        isinstance(a, str) and valid_alloc(a) for a in acquired
    ):
        raise JournalError(f"{name}: bad acquired list")
    if not isinstance(owners, dict) or not all(
        alloc in acquired and isinstance(uid, int) and not isinstance(uid, bool)
        and 0 <= uid <= MAX_UID for alloc, uid in owners.items()
    ):
        raise JournalError(f"{name}: bad owners table")
    ident = (identity[0], identity[1], identity[2], identity[3]) if identity else None
    return MountRecord(image_path, backing, ident, tuple(acquired),
                       None if mounted_at is None else float(mounted_at), dict(owners))


def parse(data: bytes) -> Journal:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise JournalError(f"not a JSON document: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        raise JournalError(f"not a version {VERSION} journal")
    mounts = raw.get("mounts")
    if not isinstance(mounts, dict):
        raise JournalError("no mounts table")
    hold_time, hold_times = raw.get("hold_time"), raw.get("hold_times", {})
    configured, emergency = raw.get("hold_time_configured"), raw.get("emergency", False)
    for key, value in (("hold_time", hold_time), ("hold_time_configured", configured)):
        if value is not None and not _seconds(value):
            raise JournalError(f"bad {key} {value!r}")
    if not isinstance(hold_times, dict) or not all(
        valid_name(name) and _seconds(value) for name, value in hold_times.items()
    ):
        raise JournalError("bad hold_times table")
    if not isinstance(emergency, bool):
        raise JournalError(f"bad emergency {emergency!r}")
    settings = SettingsRecord(None if hold_time is None else float(hold_time),
                              None if configured is None else float(configured),
                              {name: float(value) for name, value in hold_times.items()},
                              emergency)
    return Journal({name: _record(name, entry) for name, entry in mounts.items()}, settings)


def _seconds(value: Any) -> bool:
    """Whether *value* is a hold time: a finite number >= 0."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value >= 0)


def load(path: Path) -> Journal | None:
    """The journal at *path*; None if there is none. Raises `JournalError` if unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc.strerror}") from exc
    return parse(data)


def save(path: Path, journal: Journal) -> None:
    """Replace the journal atomically: a crash leaves either the old one or the new one."""
    data = (json.dumps(journal.to_json(), indent=1) + "\n").encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk must not fill up with temp files
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
