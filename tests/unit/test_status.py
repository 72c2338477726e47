"""The .status document: built from the registry, rendered, and shown as a table (pure)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from uenvfs.core.registry import Registry
from uenvfs.core.settings import Settings
from uenvfs.core.status import (
    MountStatus,
    format_table,
    mount_statuses,
    render_status,
    status_document,
)


def test_status_document_and_table() -> None:
    mounts = [
        MountStatus("zeta", "/images/zeta.sqfs", "/run/pact/uenv/zeta", "/s/mnt/zeta", "holding",
                    0, {}, 12.3456, "2026-11-30T06:00:00Z", None),
        MountStatus("alpha", "/images/alpha.sqfs", "/run/pact/uenv/alpha", "/s/mnt/alpha",
                    "mounted", 4, {"slurm-7": (0, True, 0, 0), "alloc-42": (3, False, 0, 0),
                                   "job-9": (0, False, 2, 0), "job-ns": (0, False, 0, 1)},
                    None,
                    "2026-11-30T06:00:00Z", None),
    ]
    doc = json.loads(render_status(status_document(
        "/run/pact/uenv", 60.0, False, mounts,
        {"at": "2026-11-30T06:01:00Z", "differences": ["x: y"]})))
    assert doc["version"] == 1
    assert doc["verify"] == {"at": "2026-11-30T06:01:00Z", "differences": ["x: y"]}
    assert [m["name"] for m in doc["mounts"]] == ["alpha", "zeta"]
    assert doc["mounts"][0]["allocations"] == {
        "alloc-42": {"opens": 3, "acquired": False, "cwd": 0, "namespaces": 0},
        "job-9": {"opens": 0, "acquired": False, "cwd": 2, "namespaces": 0},
        "job-ns": {"opens": 0, "acquired": False, "cwd": 0, "namespaces": 1},
        "slurm-7": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
    assert doc["mounts"][1]["hold_remaining"] == 12.346
    assert set(doc["mounts"][0]) == {"name", "image_path", "mount_point", "backing", "state",
                                     "refcount", "allocations", "hold_remaining", "mounted_at",
                                     "error", "labels", "hold_time", "device"}
    assert doc["mounts"][0]["labels"] == []
    table = format_table(doc)
    assert "alpha  mounted  4" in table
    assert "alloc-42(3),job-9(0+cwd),job-ns(0+ns),slurm-7(0+acq)" in table
    assert "zeta   holding  0     12s" in table


def test_empty_table() -> None:
    doc = status_document("/run/pact/uenv", 5.0, True, [])
    assert doc["verify"] is None
    assert format_table(doc) == "uenvfs at /run/pact/uenv: hold time 5 s, EMERGENCY MODE\n" \
                                "no image mounted\n"


@dataclass
class FakeMount:
    mounted_at: float
    device: int = 0


def test_mount_statuses_from_the_registry() -> None:
    registry = Registry(Settings(60.0))
    for name in ("used", "idle", "leaving"):
        registry[name].begin_mount(0)
        registry[name].mounted(10)
    registry["used"].acquire("slurm-7", 11)
    registry["used"].open("alloc-1", 11)
    registry["leaving"].expire(20, 60, force=True)
    registry["bad"].begin_mount(0)
    registry["bad"].mount_failed(1, "bad magic", 10)
    registry["gone"]  # known, never mounted: not listed

    statuses = {s.name: s for s in mount_statuses(
        registry, 40.0, mountpoint=Path("/run/pact/uenv"), backing_root=Path("/s/mnt"),
        image_paths={"used": Path("/images/used.sqfs")},
        mounts={"used": FakeMount(0.0, os.makedev(7, 3)), "idle": FakeMount(0.0),
                "leaving": FakeMount(0.0, os.makedev(259, 1048575))})}

    assert sorted(statuses) == ["bad", "idle", "leaving", "used"]
    used = statuses["used"]
    assert (used.state, used.refcount, used.hold_remaining) == ("mounted", 2, None)
    assert used.allocations == {"slurm-7": (0, True, 0, 0), "alloc-1": (1, False, 0, 0)}
    assert (used.image_path, used.mount_point, used.backing) == (
        "/images/used.sqfs", "/run/pact/uenv/used", "/s/mnt/used")
    assert used.mounted_at == "1970-01-01T00:00:00Z"
    # The device of its backing mount, as the mount table writes it; none where it is unknown
    # or there is no backing mount.
    assert used.device == "7:3"
    assert statuses["leaving"].device == "259:1048575"
    assert statuses["idle"].device is None
    assert statuses["idle"].state == "holding"
    assert statuses["idle"].hold_remaining == pytest.approx(30.0)
    assert statuses["leaving"].state == "holding"  # being unmounted: idle, its time over
    assert statuses["leaving"].hold_remaining == 0.0
    bad = statuses["bad"]
    assert (bad.state, bad.error, bad.mounted_at, bad.image_path, bad.device) == (
        "failed", "bad magic", None, "", None)


def test_each_image_shows_its_own_hold_time() -> None:
    registry = Registry(Settings(60.0))
    for name in ("own", "global"):
        image = registry[name]
        image.begin_mount(0.0)
        image.mounted(0.0)
    registry.settings.set_hold_time(900.0, "own")
    statuses = {m.name: m.to_json() for m in mount_statuses(
        registry, 1.0, mountpoint=Path("/m"), backing_root=Path("/b"), image_paths={},
        mounts={})}
    assert (statuses["own"]["hold_time"], statuses["global"]["hold_time"]) == (900.0, 60.0)
    assert statuses["own"]["hold_remaining"] == 899.0
