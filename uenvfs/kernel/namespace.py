"""A private mount namespace for one process, and bind mounts of images in it.

`uenvfs run` and `uenvfs start` call `enter()` and then `bind()` for each image, before they
exec the command. Root gets a new mount namespace only. Any other user gets a new user
namespace too, in which its uid and gid are mapped to themselves (no other id is mapped, so
no setuid helper is needed); the capabilities that the new user namespace gives are enough to
bind-mount, and the exec of the command as a non-root uid drops them.

The new namespace is a copy of the one it was made from, with every mount there: an image's
backing mount too, which is what is bound (client/trees.py), or else its directory of uenvfs.
Copied into a user namespace, a mount keeps its flags locked (read-only, nosuid, nodev), and so
do binds of it: the command cannot remount them otherwise.

Every mount is made a slave of the namespace it was copied from first: nothing mounted here
reaches the host, and what the host unmounts goes away here too (where the host's mounts
propagate: shared ones, as systemd makes them; a bind of one stays).

Only the standard library; nothing may start a thread before `enter()` (the kernel refuses a
new user namespace to a process with several threads).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import libc
from .mountinfo import MountEntry

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000

# The switches a site may use to turn unprivileged user namespaces off, and their "off" value.
SYSCTLS = (
    ("user.max_user_namespaces", "/proc/sys/user/max_user_namespaces", "0"),
    ("kernel.unprivileged_userns_clone", "/proc/sys/kernel/unprivileged_userns_clone", "0"),
    ("kernel.apparmor_restrict_unprivileged_userns",
     "/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1"),
)


class NamespaceError(Exception):
    """A namespace or a mount could not be made; the message says why and what to do."""


def _errno_text(code: int) -> str:
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def userns_switches() -> list[str]:
    """The sysctls of this machine that turn unprivileged user namespaces off, as
    `name = value` lines, each marked when it is the value that refuses them."""
    lines = []
    for name, path, off in SYSCTLS:
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue  # not a switch of this kernel
        lines.append(f"{name} = {value}" + (" (this refuses them)" if value == off else ""))
    return lines


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def enter() -> None:
    """Move this process into a new mount namespace (and user namespace unless root)."""
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS if uid == 0 else CLONE_NEWNS | CLONE_NEWUSER
    try:
        libc.unshare(flags)
    except OSError as exc:
        code = exc.errno or errno.EIO
        if uid == 0:
            raise NamespaceError(f"cannot create a mount namespace: {_errno_text(code)}"
                                 ) from exc
        switches = userns_switches()
        raise NamespaceError(
            f"cannot create a user namespace: {_errno_text(code)}. uenvfs run needs "
            "unprivileged user namespaces, which this site may have turned off; the sysctls "
            "that decide it: " + ("; ".join(switches) if switches else
                                  "user.max_user_namespaces (must be > 0), and "
                                  "kernel.unprivileged_userns_clone (must be 1) where it "
                                  "exists")) from exc
    if uid != 0:
        try:  # only our own ids: what an unprivileged process may map without a helper
            _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
            _write("/proc/self/setgroups", "deny\n")
            _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
        except OSError as exc:
            raise NamespaceError(f"cannot map uid {uid} and gid {gid} in the new user "
                                 f"namespace: {exc.strerror}") from exc
    try:
        libc.mount(b"none", b"/", None, libc.MS_REC | libc.MS_SLAVE, None)
    except OSError as exc:
        raise NamespaceError(f"cannot make the new mount namespace private: "
                             f"{_errno_text(exc.errno or errno.EIO)}") from exc


def bind(source: Path, target: Path) -> None:
    """Bind-mount *source* (an image's backing mount, or its directory of the running uenvfs)
    onto *target*."""
    try:
        libc.mount(os.fsencode(source), os.fsencode(target), None, libc.MS_BIND, None)
    except OSError as exc:
        code = exc.errno or errno.EIO
        hint = ""
        if code == errno.EPERM and os.geteuid() != 0:
            switches = [s for s in userns_switches() if "apparmor" in s]
            hint = (" (the site's security policy may forbid mounts in user namespaces"
                    + (f": {switches[0]}" if switches else "") + ")")
        raise NamespaceError(f"cannot bind {source} on {target}: {_errno_text(code)}{hint}"
                             ) from exc


def unbind(target: Path) -> None:
    """Undo a bind at *target* (detached at once, also if busy). Raises NamespaceError."""
    try:
        libc.umount2(os.fsencode(target), libc.MNT_DETACH)
    except OSError as exc:
        raise NamespaceError(f"cannot unmount {target}: {_errno_text(exc.errno or errno.EIO)}"
                             ) from exc


@dataclass(frozen=True)
class Bound:
    """An image of a uenvfs bound somewhere in this process's mount namespace."""

    name: str  # the image's name in uenvfs
    mount_point: str
    device: int  # of its files there: the uenvfs instance's, or the image's backing mount's


def bound_images(entries: Iterable[MountEntry], device: int | None = None,
                 trees: Mapping[int, tuple[str, str]] | None = None) -> list[Bound]:
    """The images of uenvfs bound elsewhere, among the entries of a mount table: mounts of
    type fuse.uenvfs whose root is one image's directory, not the filesystem's root (*device*:
    only those of this uenvfs, its device number); and whole backing mounts (*trees*: device
    -> the image's name and its backing mount point) anywhere but at that mount point (where
    every copy of the host's mount table has them). Later mounts over the same mount point
    hide earlier ones: only the last one there is listed."""
    trees = trees or {}
    found: dict[str, Bound] = {}
    for entry in entries:
        root = entry.root.strip("/")
        tree = trees.get(entry.device)
        if tree is not None and not root and entry.mount_point != tree[1]:
            found[entry.mount_point] = Bound(tree[0], entry.mount_point, entry.device)
        elif (entry.fstype == "fuse.uenvfs" and (device is None or entry.device == device)
                and root and "/" not in root):
            found[entry.mount_point] = Bound(root, entry.mount_point, entry.device)
        else:
            found.pop(entry.mount_point, None)
    return list(found.values())
