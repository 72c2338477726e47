"""`uenvfs run` and `uenvfs start`: a command in its own mount namespace, with images of the
running uenvfs bound at the mount points they were built for. `attach` (client/attach.py) makes
the same binds for the Slurm SPANK plugin with the parts here.

The images are looked up through the mount (client/lookup.py; which mounts them, as any
access does), their `meta/env.json` read from there, the mount points checked (against what
this namespace already shows: client/mounted.py), the command's environment made from the
caller's as uenv makes it (client/session.py), and each
image's kernel mount asked of the daemon's query socket (client/trees.py); only then is
anything done: an error leaves no namespace and no mount behind. What is bound is the image's
own kernel mount (the daemon's backing squashfs mount), so the command's reads never go through
uenvfs; the daemon counts the namespace as a use of the caller's allocation. Where that cannot
be, the image's directory of uenvfs is bound instead (said on stderr), whose accesses count as
any other. The command then replaces this process (exec): no uenvfs process stays between the
job and its command.

Exit codes (client/exits.py), as env(1) and chroot(1) have them: 125 uenvfs run itself
failed (the message says why), 126 the command cannot be executed, 127 it was not found; else
the command's own.
"""

from __future__ import annotations

import argparse
import functools
import os
import pwd
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .. import MOUNTPOINT
from ..image.uenv import Meta
from ..kernel import mountinfo, namespace
from . import exits, session, trees
from .ask import socket_at
from .exits import RunError
from .lookup import meta_beside, mount_entry, read_meta, read_status, served_name
from .mounted import bound_here, foreign_here
from .session import Placement, SessionError
from .trees import Tree


def mount_point_ok(image: Placement) -> None:
    path = Path(image.mount)
    try:
        if path.is_dir():
            return
    except OSError as exc:
        raise RunError(f"{image.name}: mount point {path}: {exc.strerror}") from exc
    if path.exists():
        raise RunError(f"{image.name}: mount point {path} is not a directory")
    raise RunError(f"{image.name}: mount point {path} does not exist: root must create it "
                   f"(mkdir {path}), or choose another with {image.name}:MOUNT")


def prepare(mountpoint: Path, images_text: str, views_text: str | None,
            environ: Mapping[str, str]) -> tuple[list[Placement], dict[str, str]]:
    """The images still to bind, and the command's environment. Binds nothing (the reads
    through uenvfs mount the images, as any access does)."""
    try:
        specs = session.parse_images(images_text)
        wanted = session.parse_views(views_text)
    except SessionError as exc:
        raise RunError(str(exc)) from exc
    read_status(mountpoint)  # first: "not running" before "no such image"
    specs = [session.ImageSpec(served_name(mountpoint, spec.image), spec.mount)
             for spec in specs]
    why = functools.partial(_error, mountpoint)
    metas = [read_meta(mountpoint, spec.image, why) for spec in specs]
    document = read_status(mountpoint)  # now with the images mounted: their image files
    images = [placed(mountpoint, spec, meta, mount_entry(document, spec.image).get("image_path"))
              for spec, meta in zip(specs, metas, strict=True)]
    return settle(mountpoint, images, wanted, environ, document)


def _error(mountpoint: Path, name: str) -> object:
    """Why uenvfs cannot mount *name*, as `.status` says."""
    return mount_entry(read_status(mountpoint), name).get("error")


def placed(mountpoint: Path, spec: session.ImageSpec, meta: Meta | None,
            image_path: object) -> Placement:
    """Where the image of *spec* goes: its image file is *image_path* (if known)."""
    if meta is None and image_path:  # a repository's image: its meta/ may be beside it
        meta = meta_beside(Path(str(image_path)))
    return Placement(spec.image, session.mount_point(spec, meta), meta,
                     str(image_path or mountpoint / spec.image))


def settle(mountpoint: Path, images: list[Placement], wanted: list[session.ViewSpec],
            environ: Mapping[str, str], document: Mapping[str, object]
            ) -> tuple[list[Placement], dict[str, str]]:
    """The *images* still to bind (their mount points checked), and the environment; the
    binds there are already are found with the `.status` *document* ({}: through uenvfs
    only), and the images that uenv put at mount points with *environ* too."""
    try:
        entries = mountinfo.read()
    except OSError:
        entries = []
    bound = {b.mount_point: b.name for b in bound_here(mountpoint, document, entries)}
    foreign = foreign_here(entries, bound, environ)
    try:
        todo = session.check_mounts(images, str(mountpoint), bound, foreign)
        views = session.choose_views(images, wanted)
    except SessionError as exc:
        raise RunError(str(exc)) from exc
    for image in todo:
        mount_point_ok(image)
    return todo, session.environment(environ, images, views)


def place(mountpoint: Path, image: Placement, tree: Tree | None, socket_path: Path | None,
           timeout: float, since: float) -> None:
    """Bind *image* in this namespace (client/trees.py), asking again, if need be, within
    the *timeout* seconds from *since* that the first questions had."""
    trees.place(mountpoint, image, tree,
                lambda: trees.ask_tree(mountpoint, image.name, socket_path, timeout, since))


def _home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return "/"


def enter(mountpoint: Path, todo: Sequence[Placement], environ: dict[str, str]) -> None:
    """Ask for the images' trees, enter a new namespace, bind the images, and go back to the
    working directory."""
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    # Asked first: the namespace is a copy of this one, the backing mounts included. No
    # thread may be started (to wait for `.socket`): the kernel makes no user namespace for a
    # process with several.
    socket_path = socket_at(mountpoint) if todo else None
    since = time.monotonic()
    found = trees.trees(mountpoint, list(todo), socket_path, trees.ANSWER_SECONDS, since)
    try:
        namespace.enter()
    except namespace.NamespaceError as exc:
        raise RunError(str(exc)) from exc
    for image, tree in zip(todo, found, strict=True):
        place(mountpoint, image, tree, socket_path, trees.ANSWER_SECONDS, since)
    for directory in (cwd, environ.get("HOME"), _home(), "/"):
        if not directory:
            continue
        try:
            os.chdir(directory)  # again: the path may now lead into an image
        except OSError:
            continue
        if directory != cwd:
            print(f"uenvfs: the working directory {cwd} is gone here; in {directory} instead",
                  file=sys.stderr)
            environ["PWD"] = directory
        return


def execute(command: Sequence[str], environ: Mapping[str, str]) -> int:
    """exec *command*; returns an exit code only if that fails (with the reason printed)."""
    try:
        os.execvpe(command[0], list(command), dict(environ))
    except FileNotFoundError:
        print(f"uenvfs: {command[0]}: command not found", file=sys.stderr)
        return exits.NOT_FOUND
    except OSError as exc:
        print(f"uenvfs: {command[0]}: {exc.strerror}", file=sys.stderr)
        return exits.CANNOT_EXECUTE
    raise AssertionError("exec returned")  # pragma: no cover


def run(mountpoint: Path, images_text: str, views_text: str | None,
        command: Sequence[str]) -> int:
    """`uenvfs run`: *command* in a session. Raises RunError before anything is done."""
    if not command:
        raise RunError("no command: uenvfs run IMAGE -- COMMAND [ARG...]")
    todo, environ = prepare(mountpoint, images_text, views_text, caller_environment())
    enter(mountpoint, todo, environ)
    return execute(command, environ)


def caller_environment() -> dict[str, str]:
    """The environment this process was started with, as its caller gave it: the one the
    kernel keeps (/proc/self/environ), not os.environ, where Python adds LC_CTYPE when the
    caller's locale is C (PEP 538's locale coercion). The first of repeated names counts, as
    in os.environ; os.environ itself where /proc does not tell."""
    try:
        data = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    found: dict[str, str] = {}
    for item in data.split(b"\0"):
        name, equals, value = item.partition(b"=")
        if name and equals:
            found.setdefault(os.fsdecode(name), os.fsdecode(value))
    return found


def shell() -> str:
    """The user's shell: $SHELL, else the password database's, else /bin/sh."""
    for candidate in (os.environ.get("SHELL"), _passwd_shell()):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return "/bin/sh"


def _passwd_shell() -> str | None:
    try:
        return pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        return None


# -- the command line ----------------------------------------------------------------------

DESCRIPTION = (
    "Run COMMAND with images of the running uenvfs at the mount points they were built for, "
    "in a private mount namespace of its own (through a user namespace when not root: no "
    "setuid program is needed). IMAGE is an image name that uenvfs serves, or a uenv label "
    "of its repositories (name/version:tag@system%uarch, partial, @* for any system, a "
    "sha256 or an id; resolved by the running uenvfs); MOUNT is where "
    "to put it (default: the 'mount' of its meta/env.json, else /user-environment); the "
    "mount point must exist. --view applies views of meta/env.json to the environment with "
    "the image's own paths (VIEW, or IMAGE:VIEW when several images have it; default: no "
    "view). The command sees UENV_MOUNT_LIST (image-file:mount-point,...) and UENV_VIEW "
    "(mount-point:uenv-name:view,...), as uenv sets them, and runs as the same user with the "
    "same groups, in the same working directory. What is at the mount point is the image's own "
    "kernel mount, the one uenvfs mounted (its reads never go through uenvfs); the command's "
    "namespace counts as a use of the caller's allocation. Where it cannot be bound (said on "
    "stderr), the image's directory of uenvfs is. Inside, `uenvfs status` says which images "
    "this process sees where. As a "
    "user other than root, files of other users show as owned by nobody and setuid programs "
    "do not gain privileges (only the caller's own ids exist in its user namespace).")
EPILOG = """exit codes: 125 uenvfs run itself failed (the one-line message says why: no
uenvfs serving, no such image, no such view, a mount point that does not exist or is taken,
no user namespaces); 126 COMMAND cannot be executed; 127 COMMAND not found; else COMMAND's own
exit code (uenvfs execs it: no uenvfs process stays in between)"""
VIEW_HELP = "views to apply (VIEW, or IMAGE:VIEW when several images have one of that name)"


def add_commands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The `run` and `start` subcommands; *add(name, help)* makes one (with --mountpoint)."""
    p = add("run", "run a command with images at the mount points they were built for")
    p.description, p.epilog = DESCRIPTION, EPILOG
    p.usage = ("uenvfs run [--view VIEW[,VIEW...]] [--mountpoint DIR] IMAGE[:MOUNT][,...] "
               "-- COMMAND [ARG...]")
    p.add_argument("images", metavar="IMAGE[:MOUNT][,IMAGE[:MOUNT]...]")
    p.add_argument("--view", metavar="VIEW[,VIEW...]", help=VIEW_HELP)
    p.add_argument("argv", nargs="*", metavar="-- COMMAND [ARG...]")
    p = add("start", "start the user's shell with images at the mount points they were "
            "built for")
    p.description = DESCRIPTION.replace("Run COMMAND", "Start the user's shell ($SHELL)")
    p.epilog = EPILOG.replace("COMMAND", "the shell")
    p.add_argument("images", nargs="+", metavar="IMAGE[:MOUNT]")
    p.add_argument("--view", metavar="VIEW[,VIEW...]", help=VIEW_HELP)


Adder = Callable[[str, str], argparse.ArgumentParser]


def command_parser(commands: Callable[[Adder], None]) -> argparse.ArgumentParser:
    """A parser of `uenvfs COMMAND ...` for the subcommands that *commands* adds (each with
    --mountpoint): what `run`, `start` and `attach` parse when started on their own."""
    parser = argparse.ArgumentParser(prog="uenvfs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--mountpoint", default=MOUNTPOINT,
                       help="where uenvfs is mounted (default %(default)s)")
        return p

    commands(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`uenvfs run ...` or `uenvfs start ...` (*argv* without the program name). Only an
    error comes back: on success this process has become the command."""
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in words:  # everything after it is the command's
        at = words.index("--")
        words, command = words[:at], words[at + 1:]
    try:
        args = command_parser(add_commands).parse_args(words)
    except SystemExit as exc:  # a usage error: 125, not a code the command could give
        return exits.RUN_FAILED if exc.code else exits.OK
    if command is not None:
        if args.command == "start" or args.argv:
            print(f"uenvfs {args.command}: unexpected words: "
                  f"{' '.join(args.argv or command)}", file=sys.stderr)
            return exits.RUN_FAILED
        args.argv = command
    mountpoint = Path(args.mountpoint).absolute()
    try:
        if args.command == "start":
            return run(mountpoint, ",".join(args.images), args.view, [shell()])
        return run(mountpoint, args.images, args.view, args.argv)
    except RunError as exc:
        print(f"uenvfs {args.command}: {exc}", file=sys.stderr)
        return exits.RUN_FAILED
    except KeyboardInterrupt:
        return exits.INTERRUPTED
