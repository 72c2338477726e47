"""The `.status` document: built from the images' state, rendered for `.status` and as a table.

Pure: no trio, no pyfuse3. The document (version 1) lists every image that is not unmounted:

    {"version": 1, "mountpoint": "/run/pact/uenv", "hold_time": 60.0, "emergency": false,
     "mounts": [{"name": "pytorch-2.5", "labels": [], "image_path": "/images/pytorch-2.5.sqfs",
                 "mount_point": "/run/pact/uenv/pytorch-2.5",
                 "backing": "/run/pact/uenvfs/mnt/pytorch-2.5", "state": "mounted",
                 "refcount": 1,
                 "allocations": {"slurm-7": {"opens": 0, "acquired": true, "cwd": 1,
                                             "namespaces": 1}},
                 "hold_time": 60.0, "hold_remaining": null,
                 "mounted_at": "2026-11-30T06:00:00Z", "error": null, "device": "7:3"}]}

`device` is the device number of the backing mount's files ("MAJ:MIN"; null while there is no
backing mount): a job's bind of the image (`uenvfs run`) shows the same.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .registry import Registry
from .state import Phase

STATUS_VERSION = 1


@dataclass
class Server:
    """The process that answers FUSE requests: `.status`'s `server` object."""

    pid: int
    started: float  # unix time
    resumes: int  # how many times the connection was resumed by a new server before it
    restart_error: str | None = None  # why the last `restart` failed (this one serves on)

    def to_json(self) -> dict[str, Any]:
        from .. import __version__

        return {"pid": self.pid, "version": __version__, "started": round(self.started, 3),
                "resumes": self.resumes, "restart_error": self.restart_error}


class Mounted(Protocol):
    """What the document needs of a backing mount."""

    mounted_at: float  # epoch seconds
    device: int  # st_dev of its files (0: unknown)


@dataclass(frozen=True)
class MountStatus:
    """One image as `.status` lists it."""

    name: str
    image_path: str
    mount_point: str
    backing: str
    state: str
    refcount: int
    allocations: Mapping[str, tuple[int, bool, int, int]] = field(default_factory=dict)
    hold_remaining: float | None = None
    mounted_at: str | None = None
    error: str | None = None
    labels: tuple[str, ...] = ()  # uenv labels of a repository's image (served by its id)
    hold_time: float | None = None  # its own (`hold-time SECONDS NAME`), else the global one
    device: str | None = None  # "MAJ:MIN" of the backing mount's files, if there is one

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": list(self.labels),
            "image_path": self.image_path,
            "mount_point": self.mount_point,
            "backing": self.backing,
            "state": self.state,
            "refcount": self.refcount,
            "allocations": {
                alloc: {"opens": opens, "acquired": acquired, "cwd": cwd,
                        "namespaces": namespaces}
                for alloc, (opens, acquired, cwd, namespaces) in sorted(self.allocations.items())
            },
            "hold_time": self.hold_time,
            "hold_remaining": (
                None if self.hold_remaining is None else round(self.hold_remaining, 3)
            ),
            "mounted_at": self.mounted_at,
            "error": self.error,
            "device": self.device,
        }


def iso_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def mount_statuses(
    registry: Registry,
    now: float,
    *,
    mountpoint: Path,
    backing_root: Path,
    image_paths: Mapping[str, Path],
    mounts: Mapping[str, Mounted],
    labels: Mapping[str, Sequence[str]] | None = None,
) -> list[MountStatus]:
    """Every image that is not unmounted. An image being unmounted shows as holding, its hold
    time over (it is still mounted, and idle)."""
    statuses = []
    for image in registry:
        if image.phase is Phase.UNMOUNTED:
            continue
        mount = mounts.get(image.name)
        deadline = registry.deadline(image)
        state = image.phase.value
        if image.phase is Phase.UNMOUNTING:
            state, deadline = Phase.HOLDING.value, now
        path = image_paths.get(image.name)
        statuses.append(MountStatus(
            name=image.name,
            image_path=str(path) if path else "",
            mount_point=str(mountpoint / image.name),
            backing=str(backing_root / image.name),
            state=state,
            refcount=image.refcount,
            allocations={a: (u.opens, u.acquired, u.cwd, u.namespaces)
                         for a, u in image.users.items()},
            hold_remaining=None if deadline is None else max(0.0, deadline - now),
            mounted_at=iso_time(mount.mounted_at) if mount else None,
            error=image.error,
            labels=tuple((labels or {}).get(image.name, ())),
            hold_time=registry.hold_time_of(image),
            device=_major_minor(mount.device) if mount and mount.device else None,
        ))
    return statuses


def _major_minor(device: int) -> str:
    return f"{os.major(device)}:{os.minor(device)}"


def status_document(
    mountpoint: str, hold_time: float, emergency: bool, mounts: Sequence[MountStatus],
    verify: Mapping[str, Any] | None = None, server: Server | None = None,
) -> dict[str, Any]:
    """The document; *verify*: the last comparison of the counts with the processes
    (`{"at": time, "differences": [...]}`), or None before the first; *server*: who serves."""
    return {
        "version": STATUS_VERSION,
        "server": None if server is None else server.to_json(),
        "mountpoint": mountpoint,
        "hold_time": hold_time,
        "emergency": emergency,
        "mounts": [m.to_json() for m in sorted(mounts, key=lambda m: m.name)],
        "verify": None if verify is None else dict(verify),
    }


def render_status(document: Mapping[str, Any]) -> bytes:
    """The bytes of `.status`."""
    return (json.dumps(document, indent=1) + "\n").encode()


def format_table(document: Mapping[str, Any]) -> str:
    """The `.status` document as a table for people (`uenvfs status`)."""
    head = (
        f"uenvfs at {document['mountpoint']}: hold time {document['hold_time']:g} s"
        + (", EMERGENCY MODE" if document.get("emergency") else "")
    )
    server = document.get("server")
    if server:
        head += (f"\nserved by pid {server['pid']} (uenvfs {server['version']}) since "
                 f"{iso_time(server['started'])}, connection resumed {server['resumes']} times")
    mounts = document.get("mounts", [])
    if not mounts:
        return head + "\nno image mounted\n"
    rows = [("NAME", "STATE", "REFS", "HOLD", "ALLOCATIONS", "ERROR")]
    for m in mounts:
        allocs = ",".join(
            f"{a}({u['opens']}{'+acq' if u['acquired'] else ''}"
            f"{'+cwd' if u.get('cwd') else ''}{'+ns' if u.get('namespaces') else ''})"
            for a, u in m["allocations"].items()
        )
        hold = "" if m["hold_remaining"] is None else f"{m['hold_remaining']:.0f}s"
        labels = m.get("labels") or []
        name = m["name"] + (f" ({labels[0]}{f' +{len(labels) - 1}' if len(labels) > 1 else ''})"
                            if labels else "")
        rows.append((name, m["state"], str(m["refcount"]), hold, allocs or "-",
                     m["error"] or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
             for r in rows]
    return head + "\n" + "\n".join(line.rstrip() for line in lines) + "\n"


def summary(document: Mapping[str, Any]) -> str:
    """One line for systemd's STATUS= (`systemctl status uenvfs`)."""
    states = [mount["state"] for mount in document["mounts"]]
    allocations = {alloc for mount in document["mounts"] for alloc in mount["allocations"]}
    emergency = "; EMERGENCY MODE" if document["emergency"] else ""
    return (f"{states.count('mounted')} images in use, {states.count('holding')} held idle, "
            f"{states.count('failed')} failed; {len(allocations)} allocations{emergency}")
