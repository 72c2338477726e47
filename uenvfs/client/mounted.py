"""What this process's mount namespace already shows, for `uenvfs run`, `start`, `attach` and
`status`: the images of a uenvfs bound here (by an enclosing `uenvfs run` or `start`), and
images that uenv itself mounted at mount points (`uenv start`, `uenv run`). Read from
/proc/self/mountinfo; never imports trio or pyfuse3."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..kernel import mountinfo, namespace
from . import session, trees


def bound_here(mountpoint: Path, document: Mapping[str, object],
               entries: list[mountinfo.MountEntry] | None = None) -> list[namespace.Bound]:
    """The images of the uenvfs at *mountpoint* bound in this process's namespace (its mount
    table, or *entries* of it): through uenvfs, or their backing mounts, which its `.status`
    *document* names with their devices ({}: none)."""
    try:
        entries = mountinfo.read() if entries is None else entries
    except OSError:
        return []
    served = mountinfo.mount_at(mountpoint, entries)
    if served is None:
        return []
    return namespace.bound_images(entries, served.device, _backing_mounts(document))


SQUASHFS = ("squashfs", "fuse.squashfuse", "fuse.squashfuse_ll")  # what uenv mounts images as


def foreign_here(entries: list[mountinfo.MountEntry], bound: Mapping[str, str],
                 environ: Mapping[str, str]) -> dict[str, str]:
    """The mount points where this namespace shows an image that uenvfs did not put there
    (uenv's own `uenv start` or `run`, say), with what is there: the last mount at a mount
    point, not one of *bound*, if it is a squashfs, or if *environ*'s UENV_MOUNT_LIST names
    its mount point. (UENV_MOUNT_LIST alone is no mount: Slurm passes it on to other nodes.)"""
    listed = {}
    for item in (environ.get(session.MOUNT_LIST) or "").split(","):
        path, _, mount = item.rpartition(":")
        listed[mount] = path
    last = {entry.mount_point: entry for entry in entries}
    found = {}
    for point, entry in last.items():
        if point in bound or (entry.fstype not in SQUASHFS and point not in listed):
            continue
        found[point] = f"a {entry.fstype} mount of {entry.source}" + (
            f" ({listed[point]} in {session.MOUNT_LIST})" if point in listed else "")
    return found


def _backing_mounts(document: Mapping[str, object]) -> dict[int, tuple[str, str]]:
    """The backing mounts that a `.status` *document* lists: device -> (image, mount point)."""
    mounts = document.get("mounts")
    found = {}
    for entry in mounts if isinstance(mounts, list) else []:
        try:
            device = trees.parse_device(entry["device"])
        except (KeyError, TypeError, ValueError):
            continue  # not mounted
        found[device] = (str(entry.get("name")), str(entry.get("backing")))
    return found
