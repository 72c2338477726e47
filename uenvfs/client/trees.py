"""The kernel path of `uenvfs run`, `start` and `attach`: each image's own kernel mount (the
daemon's backing squashfs mount) bound at its mount point, so that the command's reads go
to the kernel and never through uenvfs (no server CPU per access, no pause while a server is
killed, restarted or hung).

Before the command's mount namespace is made, the daemon's query socket is asked for each
image's `tree` (core/queries.py): it mounts the image if need be, counts the handout for the
caller's allocation (so that the image cannot expire before it is bound), and says where the
backing mount is and what its device is. The new namespace is a copy of this one, the backing
mounts included; there the backing mount is bound at the mount point, and the mount point's
device checked against the one answered:

  - the backing mount is not in the namespace (unmounted meanwhile, or mounted after the
    namespace was made, where mounts do not propagate), or the mount point shows another
    device after the bind: the daemon is asked again and the bind tried once more; then the
    image is bound through uenvfs instead (its backing mount is not here), or refused (what the
    bind shows is not the image's backing mount);
  - the kernel refuses the bind (a security policy, a state directory the user may not
    traverse), or the daemon hands out no tree (an older one): the image's directory of uenvfs
    is bound, as before the kernel path, with one line on stderr that says why.

Either way the command gets the image's right tree or a clear error, never an empty or
another one. A bind of a mount copied into a user namespace keeps its flags locked (read-only,
nosuid, nodev): the command cannot remount it otherwise. Nothing is reachable here that the
state directory's `mnt/` does not show already.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.queries import request
from ..kernel import namespace
from ..kernel.namespace import NamespaceError
from .ask import ask
from .exits import RunError
from .session import Placement

ANSWER_SECONDS = 30.0  # how long `run` and `start` wait for the daemon's answer
# The refusals of an older daemon (no op "tree": EINVAL, its message "no op 'tree' ...") and
# of one that does not know its backing mount's device: the image is bound through uenvfs
# instead. Another EINVAL refuses the word (an ambiguous label).
NO_OP = "no op "


class NoTree(Exception):
    """The daemon hands out no tree of an image: bind it through uenvfs (the message says
    why)."""


@dataclass(frozen=True)
class Tree:
    """Where an image's backing mount is, as the daemon answered `tree`."""

    name: str
    backing: Path
    device: int  # st_dev of its files
    image_path: str = ""  # its image file

    @property
    def shown(self) -> str:
        return _major_minor(self.device)


def _major_minor(device: int | None) -> str:
    return "none" if device is None else f"{os.major(device)}:{os.minor(device)}"


def parse_device(text: object) -> int:
    """The device *text* names ("MAJ:MIN", as `.status` and `tree` write it); ValueError if
    it names none."""
    try:
        major, minor = (int(number) for number in str(text).split(":"))
    except ValueError:
        raise ValueError(f"{text!r} is not a device (MAJOR:MINOR)") from None
    return os.makedev(major, minor)


def ask_tree(mountpoint: Path, name: str, socket_path: Path | None, timeout: float,
             since: float) -> Tree:
    """The tree of image *name* of the uenvfs at *mountpoint*, answered through its query
    socket (*socket_path*, else where `.socket` leads) within *timeout* seconds from *since*
    (time.monotonic()). NoTree if the daemon hands out none; RunError if it refuses, or does
    not answer in time."""
    answer = ask(mountpoint, request("tree", image=name), socket_path, timeout, since)
    if not answer["ok"]:
        error = answer.get("error")
        code = answer.get("errno")
        if code == "ENODEV" or (code == "EINVAL" and str(error).startswith(NO_OP)):
            raise NoTree(f"uenvfs hands out no kernel mount of it ({error})")
        if code == errno.errorcode[errno.EIO]:
            raise RunError(f"image {name} cannot be mounted: {error} (uenvfs status shows it)")
        raise RunError(f"image {name}: {error}")
    try:
        return Tree(str(answer["name"]), Path(str(answer["backing"])),
                    parse_device(answer["device"]), str(answer.get("image_path", "")))
    except (KeyError, ValueError) as exc:
        raise RunError(f"uenvfs at {mountpoint} answered what is not a tree: {answer}"
                       ) from exc


def trees(mountpoint: Path, images: list[Placement], socket_path: Path | None,
          timeout: float, since: float) -> list[Tree | None]:
    """The tree of each of *images* (None where the daemon hands out none, said on stderr),
    all answered within *timeout* seconds from *since*."""
    found: list[Tree | None] = []
    for image in images:
        try:
            found.append(ask_tree(mountpoint, image.name, socket_path, timeout, since))
        except NoTree as exc:
            _through_uenvfs(image, str(exc))
            found.append(None)
    return found


def _through_uenvfs(image: Placement, why: str) -> None:
    print(f"uenvfs: {image.name}: {why}; bound through uenvfs at {image.mount} instead (every "
          "access goes through the daemon)", file=sys.stderr)


def place(mountpoint: Path, image: Placement, tree: Tree | None,
          again: Callable[[], Tree]) -> None:
    """Bind *image* at its mount point in this process's namespace: its backing mount
    (*tree*; *again* asks the daemon once more), checked by its device; else its directory of
    uenvfs. RunError if neither can be bound, or the bind shows another device twice."""
    target = Path(image.mount)
    if tree is not None:
        try:
            why = _bind_tree(image.name, target, tree, again)
        except NoTree as exc:
            why = str(exc)
        if why is None:
            return
        _through_uenvfs(image, why)
    try:
        namespace.bind(mountpoint / image.name, target)
    except NamespaceError as exc:
        raise RunError(str(exc)) from exc


def _bind_tree(name: str, target: Path, tree: Tree, again: Callable[[], Tree]) -> str | None:
    """Bind *tree* at *target* and check it; None once done, else why it cannot be (nothing
    is bound then). RunError if the mount point shows another device after the bind, twice."""
    shown: int | None = None
    for attempt in range(2):
        if attempt:
            tree = again()
        try:
            here = os.stat(tree.backing).st_dev
        except OSError as exc:
            return f"cannot reach its kernel mount at {tree.backing}: {exc.strerror}"
        if here != tree.device:
            if attempt:
                return (f"its kernel mount ({tree.shown}) is not at {tree.backing} in this "
                        "mount namespace (mounted after the namespace was made, where mounts "
                        "do not propagate)")
            continue
        try:
            namespace.bind(tree.backing, target)
        except NamespaceError as exc:
            return str(exc)
        try:
            shown = os.stat(target).st_dev
        except OSError:
            shown = None
        if shown == tree.device:
            return None
        try:
            namespace.unbind(target)
        except NamespaceError as exc:
            raise RunError(f"image {name}: {target} shows device {_major_minor(shown)}, not "
                           f"its kernel mount's {tree.shown}, and {exc}") from exc
    raise RunError(f"image {name}: {target} showed device {_major_minor(shown)} after a bind "
                   f"of its kernel mount, not {tree.shown}, twice; nothing is bound there")
