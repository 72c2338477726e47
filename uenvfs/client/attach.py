"""`uenvfs attach`: what the Slurm SPANK plugin (scripts/slurm/uenvfs_spank.c) runs, as root.

- In a step's own mount namespace (the plugin makes one in slurmstepd for each step, which
  the step's tasks inherit), with uenv's options
  (`--uenv IMAGE[:MOUNT][,...]`, `--view [IMAGE:]VIEW[,...]`): each image is asked of the
  daemon's query socket (`tree`: a name, a uenv label, or the path of an image file it serves),
  its meta/env.json read from its kernel mount, the mount points and views checked, and only
  then bound (client/trees.py). The step's environment comes in on stdin and the changes for
  the views go out on stdout, as the plugin applies them (`changes`); a view that the step's
  UENV_VIEW lists already (an `srun` inside the batch script) is not applied again.
- In the same namespace, without `--uenv` (a job that named its images in its comment): the
  images that the job's allocation acquired, at the mount points of their meta/env.json; it
  prints the step's UENV_MOUNT_LIST.
- With `--acquire UID`, in the job's prolog: acquires each image of `--uenv` for the
  allocation (`.control`), as the prolog script does for the comment; binds nothing.

Every question to the daemon shares one deadline (`--timeout`): a stopped daemon fails the
step with one line, and never holds it up longer. The meta/env.json of an image is read from
its kernel mount (or beside a repository's image file), never through uenvfs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..core.queries import request
from ..image.uenv import ENV_JSON, REPOSITORY_IMAGE, Meta, MetaFormatError, parse_meta
from . import exits, session, trees
from .ask import ask
from .exits import CliError, RunError
from .lookup import meta_beside, read_meta
from .run import command_parser, place, placed, settle
from .session import ImageSpec, Placement, SessionError
from .trees import Tree

TIMEOUT = 10.0  # seconds `attach` waits for the daemon's answers, by default
IMAGE_SUFFIXES = (".squashfs", ".sqfs")


def _own_namespace(server: object) -> bool:
    """Whether this process's mount namespace is not the one uenvfs serves in (the host's);
    *server* is the `server` of an `allocation` answer."""
    pid = server.get("pid") if isinstance(server, dict) else None
    try:
        return os.stat("/proc/self/ns/mnt").st_ino != os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return False


def _acquired(mountpoint: Path, alloc: str, socket_path: Path | None, timeout: float,
              since: float) -> list[dict[str, object]]:
    """The images *alloc* acquired, as the query socket's `allocation` answers; refuses to go
    on in the namespace where uenvfs serves."""
    answer = ask(mountpoint, request("allocation", alloc=alloc), socket_path, timeout, since)
    if not answer["ok"]:
        raise RunError(f"uenvfs at {mountpoint}: {answer.get('error')}")
    if not _own_namespace(answer.get("server")):
        raise RunError("attach binds images in its caller's mount namespace, and this is the "
                       "one uenvfs serves in: only the SPANK plugin, which makes one for each "
                       "step, runs it")
    acquired = answer.get("images")
    return [e for e in acquired if isinstance(e, dict)] if isinstance(acquired, list) else []


def attach(mountpoint: Path, alloc: str, socket_path: Path | None, timeout: float) -> str:
    """The comment form: bind every image that *alloc* acquired at its mount point, in this
    process's mount namespace, which the plugin made for a step (never the host's). The
    daemon's query socket (*socket_path*, else where `.socket` leads) names the images and
    their kernel mounts, all within *timeout* seconds. Returns UENV_MOUNT_LIST for the step
    ("" if the allocation acquired nothing)."""
    since = time.monotonic()
    entries = _acquired(mountpoint, alloc, socket_path, timeout, since)
    errors = {str(entry.get("name")): entry.get("error") for entry in entries}
    images = []
    for entry in entries:
        name = str(entry.get("name"))
        if entry.get("state") == "failed":
            raise RunError(f"image {name} cannot be mounted: {errors[name]} (uenvfs status "
                           "shows it)")
        meta = read_meta(mountpoint, name, errors.get)
        images.append(placed(mountpoint, ImageSpec(name, None), meta, entry.get("image_path")))
    if not images:
        return ""
    todo, environ = settle(mountpoint, images, [], {}, {})
    found = trees.trees(mountpoint, todo, socket_path, timeout, since)
    for image, tree in zip(todo, found, strict=True):
        place(mountpoint, image, tree, socket_path, timeout, since)
    return environ[session.MOUNT_LIST]


def attach_uenv(mountpoint: Path, alloc: str, images_text: str, views_text: str | None,
                environ: Mapping[str, str], socket_path: Path | None, timeout: float
                ) -> dict[str, str | None]:
    """uenv's options for a step: bind the images of *images_text* (`--uenv`) in this
    process's mount namespace, which the plugin made for the step, and return the changes
    to the step's environment *environ* for the views of *views_text* (`--view`) and uenv's
    variables: {name: value, or None to unset}. Views listed in *environ*'s UENV_VIEW are
    applied already (the batch script's, for an `srun` in it): not again. Everything is
    decided before anything is bound."""
    since = time.monotonic()
    try:
        specs = session.parse_images(images_text)
        wanted = session.parse_views(views_text)
    except SessionError as exc:
        raise RunError(str(exc)) from exc
    _acquired(mountpoint, alloc, socket_path, timeout, since)  # not in the host's namespace
    found = [_tree(mountpoint, spec.image, socket_path, timeout, since) for spec in specs]
    images = [placed(mountpoint, ImageSpec(tree.name, spec.mount), _meta(tree), tree.image_path)
              for spec, tree in zip(specs, found, strict=True)]
    applied = set(_entries(environ.get(session.VIEW_LIST)))
    try:
        chosen = session.choose_views(images, wanted)
    except SessionError as exc:
        raise RunError(str(exc)) from exc
    fresh = [session.ViewSpec(image.name, view.name) for image, view in chosen
             if _view_entry(image, view.name) not in applied]
    todo, after = settle(mountpoint, images, fresh, environ, {})
    by_name = {tree.name: tree for tree in found}
    for image in todo:
        place(mountpoint, image, by_name[image.name], socket_path, timeout, since)
    return changes(environ, after)


def _entries(value: str | None) -> list[str]:
    return [entry for entry in (value or "").split(",") if entry]


def _view_entry(image: Placement, view: str) -> str:
    """The view's entry in UENV_VIEW, as session.environment writes it."""
    return f"{image.mount}:{image.uenv_name}:{view}"


def _tree(mountpoint: Path, word: str, socket_path: Path | None, timeout: float,
          since: float) -> Tree:
    """The tree of the image *word* names: a name or a uenv label, as the daemon resolves
    them, or the path of an image file that it serves (under its name: the file's without
    its suffix, or a repository image's sha256)."""
    if not word.startswith("/"):
        return trees.ask_tree(mountpoint, word, socket_path, timeout, since)
    path = Path(word)
    name = _served_as(path)
    try:
        tree = trees.ask_tree(mountpoint, name, socket_path, timeout, since)
    except RunError as exc:
        raise RunError(f"{word}: not an image file that uenvfs at {mountpoint} serves ({exc})"
                       ) from None
    if os.path.realpath(tree.image_path) != os.path.realpath(path):
        raise RunError(f"{word}: not an image file that uenvfs at {mountpoint} serves (its "
                       f"image {tree.name} is {tree.image_path})")
    return tree


def _served_as(path: Path) -> str:
    """The name under which uenvfs would serve the image file *path*: the file's without its
    suffix (an image directory's), or a repository image's sha256 (its directory)."""
    name = path.parent.name if path.name == REPOSITORY_IMAGE else path.name
    for suffix in IMAGE_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _meta(tree: Tree) -> Meta | None:
    """The image's meta/env.json, read from its kernel mount, else beside its image file."""
    path = tree.backing / ENV_JSON
    try:
        return parse_meta(path.read_bytes())
    except FileNotFoundError:
        return meta_beside(Path(tree.image_path))
    except OSError as exc:
        raise RunError(f"image {tree.name}: {path}: {exc.strerror}") from exc
    except MetaFormatError as exc:
        raise RunError(f"image {tree.name}: {ENV_JSON}: {exc}") from exc


def changes(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, str | None]:
    """What turns environment *before* into *after*: {name: value, or None to unset}."""
    changed: dict[str, str | None] = {k: v for k, v in after.items() if before.get(k) != v}
    changed.update((name, None) for name in before if name not in after)
    return changed


def encode(changed: Mapping[str, str | None]) -> bytes:
    """Changes as the plugin reads them: `NAME=VALUE` to set, `NAME` to unset, each ended by
    a NUL."""
    return b"".join((name if value is None else f"{name}={value}").encode() + b"\0"
                    for name, value in changed.items())


def read_environ(data: bytes) -> dict[str, str]:
    """An environment as the plugin writes it: `NAME=VALUE` entries, each ended by a NUL
    (an entry without `=` is skipped)."""
    environ = {}
    for entry in data.decode(errors="surrogateescape").split("\0"):
        name, equals, value = entry.partition("=")
        if equals and name:
            environ[name] = value
    return environ


def acquire(mountpoint: Path, alloc: str, uid: int, images_text: str) -> None:
    """For the job's prolog: acquire every image of *images_text* for *alloc*, the job of
    *uid*. Each is tried; RunError names those that failed."""
    from .admin import write_control

    try:
        specs = session.parse_images(images_text)
    except SessionError as exc:
        raise RunError(str(exc)) from exc
    failed = []
    for spec in specs:
        # A path: the step checks that it is the file served under this name.
        word = _served_as(Path(spec.image)) if spec.image.startswith("/") else spec.image
        try:
            write_control(mountpoint, f"acquire {word} {alloc} {uid}")
        except CliError as exc:
            failed.append(f"{spec.image}: {exc}")
    if failed:
        raise RunError("; ".join(failed))


# -- the command line ----------------------------------------------------------------------


def add_attach(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = add("attach", "for the Slurm SPANK plugin: bind a job's images for a step")
    p.description = (
        "For the Slurm SPANK plugin (scripts/slurm/uenvfs_spank.c), as root, in the mount "
        "namespace the plugin made for a step. With --uenv: bind each image of it (a name, a "
        "uenv label, or the path of an image file that uenvfs serves; MOUNT, else the mount "
        "of its meta/env.json, else /user-environment), read the step's environment from "
        "stdin (NAME=VALUE entries, each ended by a NUL) and print the changes that the "
        "views of --view and uenv's UENV_MOUNT_LIST and UENV_VIEW make to it (NAME=VALUE to "
        "set, NAME to unset, each ended by a NUL); views that its UENV_VIEW lists are not "
        "applied again. Without --uenv: bind every image that ALLOC acquired at the mount "
        "point of its meta/env.json (else /user-environment), and print the step's "
        "UENV_MOUNT_LIST (nothing if ALLOC acquired no image). With --acquire UID (in the "
        "job's prolog): acquire each image of --uenv for ALLOC, the job of UID; bind nothing. "
        "If the daemon has not answered within --timeout seconds, attach fails. Refuses to "
        "bind in the host's mount namespace.")
    p.epilog = "exit codes: 0 done; 125 failed (the one-line message says why)"
    p.add_argument("alloc", metavar="ALLOC")
    p.add_argument("--uenv", metavar="IMAGE[:MOUNT][,...]", help="uenv's --uenv")
    p.add_argument("--view", metavar="[IMAGE:]VIEW[,...]", help="uenv's --view")
    p.add_argument("--acquire", metavar="UID", type=int,
                   help="in the job's prolog: acquire the images of --uenv for ALLOC")
    p.add_argument("--socket", metavar="PATH",
                   help="the daemon's query socket (default: where MOUNTPOINT/.socket leads)")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=TIMEOUT,
                   help="give up if uenvfs has not answered within this (default %(default)g)")


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """`uenvfs attach ...` (*argv* without the program name)."""
    parser = command_parser(add_attach)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # a usage error: 125, as for run
        return exits.RUN_FAILED if exc.code else exits.OK
    try:
        return _attach(args, Path(args.mountpoint).absolute())
    except RunError as exc:
        print(f"uenvfs attach: {exc}", file=sys.stderr)
        return exits.RUN_FAILED
    except KeyboardInterrupt:
        return exits.INTERRUPTED


def _attach(args: argparse.Namespace, mountpoint: Path) -> int:
    socket_path = Path(args.socket).absolute() if args.socket else None
    if args.view is not None and args.uenv is None:
        raise RunError(f"--view={args.view} is given, but --uenv is not")
    if args.acquire is not None:
        if args.uenv is None:
            raise RunError("--acquire needs --uenv")
        acquire(mountpoint, args.alloc, args.acquire, args.uenv)
        return exits.OK
    if args.uenv is None:
        print(attach(mountpoint, args.alloc, socket_path, args.timeout))
        return exits.OK
    environ = read_environ(sys.stdin.buffer.read())
    changed = attach_uenv(mountpoint, args.alloc, args.uenv, args.view, environ, socket_path,
                          args.timeout)
    sys.stdout.buffer.write(encode(changed))
    sys.stdout.flush()
    return exits.OK
