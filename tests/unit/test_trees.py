"""client/trees.py without a daemon or a mount: the answers to `tree`, and what is bound where
for each outcome of the device check (the system calls replaced by fakes)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from uenvfs.client import trees
from uenvfs.client.exits import RunError
from uenvfs.client.session import Placement
from uenvfs.client.trees import NoTree, Tree
from uenvfs.kernel import namespace
from uenvfs.kernel.namespace import NamespaceError

MOUNTPOINT = Path("/run/pact/uenv")
BACKING = Path("/run/pact/uenvfs/mnt/prgenv")
IMAGE = Placement("prgenv", "/user-environment", None, "/images/prgenv.sqfs")
DEVICE = os.makedev(7, 3)
TREE = Tree("prgenv", BACKING, DEVICE, "/images/prgenv.sqfs")


def answered(monkeypatch: pytest.MonkeyPatch, answer: dict[str, Any]) -> None:
    monkeypatch.setattr(trees, "ask", lambda *args: answer)


def test_the_answers_to_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    answered(monkeypatch, {"ok": True, "name": "prgenv", "image_path": "/images/prgenv.sqfs",
                           "backing": str(BACKING), "device": "7:3"})
    assert trees.ask_tree(MOUNTPOINT, "prgenv", None, 1.0, 0.0) == TREE
    # An older daemon (no op "tree"), or one that does not know the device: through uenvfs.
    for code in ("EINVAL", "ENODEV"):
        answered(monkeypatch, {"ok": False, "errno": code, "error": "no op 'tree'"})
        with pytest.raises(NoTree, match=r"hands out no kernel mount of it \(no op 'tree'\)"):
            trees.ask_tree(MOUNTPOINT, "prgenv", None, 1.0, 0.0)
    answered(monkeypatch, {"ok": False, "errno": "EIO", "error": "bad magic"})
    with pytest.raises(RunError, match=r"^image prgenv cannot be mounted: bad magic \(uenvfs "):
        trees.ask_tree(MOUNTPOINT, "prgenv", None, 1.0, 0.0)
    answered(monkeypatch, {"ok": False, "errno": "ENOENT", "error": "no image named 'x'"})
    with pytest.raises(RunError, match=r"^image prgenv: no image named 'x'$"):
        trees.ask_tree(MOUNTPOINT, "prgenv", None, 1.0, 0.0)
    for device in ("7", "a:b", None):
        answered(monkeypatch, {"ok": True, "name": "p", "backing": "/b", "device": device})
        with pytest.raises(RunError, match="answered what is not a tree"):
            trees.ask_tree(MOUNTPOINT, "prgenv", None, 1.0, 0.0)


class Kernel:
    """The fakes of the system calls: the device each path shows, the binds made."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, backing: int | OSError,
                 after_bind: list[int]) -> None:
        self.devices: dict[Path, int | OSError] = {BACKING: backing}
        self.after_bind = after_bind  # what the mount point shows after each bind
        self.binds: list[tuple[Path, Path]] = []
        self.unbinds = 0
        self.refuse: NamespaceError | None = None
        monkeypatch.setattr(namespace, "bind", self.bind)
        monkeypatch.setattr(namespace, "unbind", self.unbind)
        self.real_stat = os.stat
        monkeypatch.setattr(os, "stat", self.stat)

    def bind(self, source: Path, target: Path) -> None:
        if self.refuse is not None and source == BACKING:
            raise self.refuse
        self.binds.append((source, target))
        if source == BACKING:
            self.devices[target] = self.after_bind.pop(0)

    def unbind(self, target: Path) -> None:
        self.unbinds += 1

    def stat(self, path: Path) -> os.stat_result:
        if Path(path) not in self.devices:
            return self.real_stat(path)
        device = self.devices[Path(path)]
        if isinstance(device, OSError):
            raise device
        return os.stat_result((0o40755, 1, device, 2, 0, 0, 0, 0, 0, 0))


def place(tree: Tree | None = TREE, again: list[Tree] | None = None) -> list[Tree]:
    """trees.place of IMAGE; the trees *again* hands out, in turn; returns those asked for."""
    asked: list[Tree] = []

    def ask_again() -> Tree:
        if not again:
            raise NoTree("uenvfs hands out no kernel mount of it (nope)")
        asked.append(again.pop(0))
        return asked[-1]

    trees.place(MOUNTPOINT, IMAGE, tree, ask_again)
    return asked


FUSE_BIND = (MOUNTPOINT / "prgenv", Path("/user-environment"))
KERNEL_BIND = (BACKING, Path("/user-environment"))


def test_the_kernel_mount_is_bound_and_checked(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    kernel = Kernel(monkeypatch, DEVICE, [DEVICE])
    assert place() == []
    assert (kernel.binds, kernel.unbinds) == ([KERNEL_BIND], 0)
    assert capsys.readouterr().err == ""


def test_another_device_once_is_asked_again_twice_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = Kernel(monkeypatch, DEVICE, [os.makedev(0, 40), DEVICE])
    assert place(again=[TREE]) == [TREE]
    assert (kernel.binds, kernel.unbinds) == ([KERNEL_BIND, KERNEL_BIND], 1)
    kernel = Kernel(monkeypatch, DEVICE, [os.makedev(0, 40), os.makedev(0, 40)])
    with pytest.raises(RunError, match=r"^image prgenv: /user-environment showed device 0:40 "
                       r"after a bind of its kernel mount, not 7:3, twice; nothing is bound"):
        place(again=[TREE])
    assert (kernel.binds, kernel.unbinds) == ([KERNEL_BIND, KERNEL_BIND], 2)


def test_a_kernel_mount_not_in_this_namespace_is_bound_through_uenvfs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The backing directory shows the state directory's device: the mount is not there, also
    # after the daemon mounted it again.
    kernel = Kernel(monkeypatch, os.makedev(254, 0), [])
    assert place(again=[Tree("prgenv", BACKING, os.makedev(7, 4))]) != []
    assert kernel.binds == [FUSE_BIND]
    assert capsys.readouterr().err == (
        f"uenvfs: prgenv: its kernel mount (7:4) is not at {BACKING} in this mount namespace "
        "(mounted after the namespace was made, where mounts do not propagate); bound through "
        "uenvfs at /user-environment instead (every access goes through the daemon)\n")
    # ... and where the daemon then hands out none.
    kernel = Kernel(monkeypatch, os.makedev(254, 0), [])
    place(again=[])
    assert kernel.binds == [FUSE_BIND]
    assert "hands out no kernel mount of it (nope); bound through uenvfs" in \
        capsys.readouterr().err


def test_a_kernel_mount_that_cannot_be_reached_or_bound(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = Kernel(monkeypatch, PermissionError(errno.EACCES, "Permission denied"), [])
    place()
    assert kernel.binds == [FUSE_BIND]
    assert capsys.readouterr().err.startswith(
        f"uenvfs: prgenv: cannot reach its kernel mount at {BACKING}: Permission denied; "
        "bound through uenvfs at /user-environment instead")
    kernel = Kernel(monkeypatch, DEVICE, [])
    kernel.refuse = NamespaceError("cannot bind a on b: Operation not permitted (EPERM)")
    place()
    assert kernel.binds == [FUSE_BIND]
    assert capsys.readouterr().err.startswith(
        "uenvfs: prgenv: cannot bind a on b: Operation not permitted (EPERM); bound through")
    # No tree at all (the daemon handed out none): the FUSE directory, nothing said again.
    kernel = Kernel(monkeypatch, DEVICE, [])
    place(None)
    assert kernel.binds == [FUSE_BIND]
    assert capsys.readouterr().err == ""


def test_devices_as_status_writes_them() -> None:
    assert trees.parse_device("259:1048575") == os.makedev(259, 1048575)
    for text in ("", "7", "7:3:1", "x:y", None):
        with pytest.raises(ValueError, match="is not a device"):
            trees.parse_device(text)
