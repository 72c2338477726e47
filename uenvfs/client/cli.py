"""The `uenvfs` command: its parser and `main`, and `serve`, which runs the daemon. The other
subcommands are those of client/admin.py (they talk to a running daemon only through the files
at its mount root: `.control`, `.status`, `.metrics`), client/images.py (`images`, `check`,
`env`: they read the images themselves) and client/run.py and attach.py (`run`, `start`,
`attach`, which start through `main` the short way).

Exit codes (client/exits.py): 0 success; 1 the daemon refused the command or failed (the
message says why); 2 bad usage; 3 no uenvfs is serving at the mountpoint; 130 interrupted
(Ctrl-C); 141 the reader of the output went away. `run`, `start` and `attach` have their own
(client/run.py, client/attach.py).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import __version__
from ..core import config as config_mod
from ..core import control
from . import admin, exits, images
from .exits import CliError

CHECK_TIMEOUT = 300.0  # seconds `uenvfs check` gives rdsquashfs by default

EPILOG = """exit codes: 0 success; 1 the daemon refused the command or failed (the one-line
message says why: 'Invalid argument', 'No such file or directory', 'Operation not permitted',
'Permission denied', 'Input/output error'); 2 bad usage; 3 no uenvfs serving at the mountpoint;
141 the reader of the output went away (uenvfs status | head), as a process killed by SIGPIPE"""

CHECK_EPILOG = """exit codes: 0 the image is valid; 1 it is not, or it cannot be read, or the name
or label is unknown or ambiguous (the one-line message says why); 2 bad usage or configuration;
141 the reader of the output went away. check reads the image itself (rdsquashfs from
squashfs-tools-ng) and needs no running daemon."""
IMAGE_EPILOG = """exit codes: 0 success; 1 failed: the image is not valid or cannot be read, the
name is unknown, meta/env.json is missing or broken, no such view (env) (the one-line message
says why); 2 bad usage or configuration; 141 the reader of the output went away. These commands
read the images themselves (with rdsquashfs from squashfs-tools-ng) and need no running
daemon."""


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {
        "mountpoint": Path(args.mountpoint) if args.mountpoint else None,
        "images": tuple(Path(p) for p in args.images) if args.images else None,
        "maps": tuple(Path(p) for p in args.map) if args.map else None,
        "repos": tuple(Path(p) for p in args.repo) if args.repo else None,
        "program_map": Path(args.program_map) if args.program_map else None,
        "hold_time": args.hold_time,
        "state_dir": Path(args.state_dir) if args.state_dir else None,
        "backend": args.backend,
        "log_level": args.log_level,
    }
    file = Path(args.config) if args.config else None
    try:
        cfg = config_mod.load(file, overrides)
    except config_mod.ConfigError as exc:
        raise CliError(f"configuration: {exc}", exits.USAGE) from exc
    from ..keeper.protocol import ENV_KEEPER
    from ..keeper.serve import serve as keep
    from ..keeper.serve import setup_logging

    if ENV_KEEPER in os.environ:  # started by the keeper: serve
        from ..server.daemon import serve

        return serve(cfg, lambda: config_mod.load(file, overrides))

    setup_logging(cfg.log_level)
    return keep()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uenvfs", description="Lazy-mounting FUSE filesystem for uenv SquashFS images.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"uenvfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func: Callable[[argparse.Namespace], int],
            mountpoint: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        p.set_defaults(func=func)
        if mountpoint:
            p.add_argument("--mountpoint", default=str(config_mod.DEFAULT_MOUNTPOINT),
                           help="where uenvfs is mounted (default %(default)s)")
        return p

    p = add("serve", "run the filesystem in the foreground", cmd_serve, mountpoint=False)
    p.add_argument("--mountpoint", help="where to mount (default /run/pact/uenv)")
    p.add_argument("--images", action="append", metavar="DIR",
                   help="image directory (repeatable; default /images)")
    p.add_argument("--map", action="append", metavar="FILE", help="map file (repeatable)")
    p.add_argument("--repo", action="append", metavar="DIR",
                   help="uenv repository: a directory with index.db (repeatable)")
    p.add_argument("--program-map", metavar="EXE", help="program map")
    p.add_argument("--hold-time", type=float, metavar="SECONDS",
                   help="unmount this long after the last use (default 60)")
    p.add_argument("--state-dir", metavar="DIR", help="journal and backing mounts "
                   "(default /run/pact/uenvfs)")
    p.add_argument("--backend", choices=config_mod.BACKENDS)
    p.add_argument("--config", metavar="FILE", help="configuration file "
                   "(default /etc/uenvfs.toml if it exists)")
    p.add_argument("--log-level", choices=config_mod.LOG_LEVELS)

    p = add("status", "show the mounted images, refcounts and hold timers", admin.cmd_status)
    p.add_argument("--json", action="store_true", help="print the .status document")
    p.add_argument("--verify", action="store_true",
                   help="compare every count with a scan of the processes (open files, "
                        "mappings, programs, working directories) and print what differs; "
                        "exit 1 if anything does")
    add("metrics", "print .metrics (Prometheus text format)", admin.cmd_metrics)

    p = add("images", "list the images of the image sources, with their uenv metadata",
            images.cmd_images, mountpoint=False)
    p.description = (
        "List every image that the image directories, map files and uenv repositories name "
        "(a program map cannot be listed; a repository's image once per label): name as "
        "served, image path, size, and from its meta/env.json the uenv name, views "
        "and description. An image without meta/env.json, with a broken one, or that cannot "
        "be read is listed too, with the reason in the last column. Default sources: those "
        "of the configuration file (/etc/uenvfs.toml, else the directory /images).")
    p.epilog = IMAGE_EPILOG
    p.add_argument("--images", action="append", metavar="DIR",
                   help="image directory (repeatable; replaces the configured ones)")
    p.add_argument("--config", metavar="FILE", help="configuration file "
                   "(default /etc/uenvfs.toml if it exists)")
    p.add_argument("--repo", action="append", metavar="DIR",
                   help="uenv repository (repeatable; replaces the configured ones)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of objects: name, image_path, size (bytes), "
                   "uenv_name, description, mount, views, problem; and for the labels of a "
                   "uenv repository label, sha256, id, date, system, uarch (else null)")

    p = add("check", "validate an image without mounting it", images.cmd_check,
            mountpoint=False)
    p.description = (
        "Validate IMAGE without mounting it: its superblock (SquashFS 4.0 magic, size not "
        "truncated), then every inode and directory entry, the ID and fragment tables "
        "(rdsquashfs -d; file data is not read). Prints 'IMAGE: ok (...)' or fails with the "
        "reason. IMAGE is a path to an image file, or an image name or uenv label "
        "(name/version:tag@system%uarch, partial, sha256 or id) of the configured sources.")
    p.epilog = CHECK_EPILOG
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--repo", action="append", metavar="DIR",
                   help="uenv repository (repeatable; replaces the configured ones)")
    p.add_argument("--config", metavar="FILE", help="configuration file "
                   "(default /etc/uenvfs.toml if it exists)")
    p.add_argument("--timeout", type=float, default=CHECK_TIMEOUT, metavar="SECONDS",
                   help="give up after this long (default %(default)g)")

    p = add("env", "print the shell exports of a view of an image's meta/env.json",
            images.cmd_env, mountpoint=False)
    p.description = (
        "Print the export/unset lines that a view of the image's meta/env.json defines, as "
        "uenv applies them: scalars (null unsets), then each list operation in order "
        "(prepend and append keep the current value, set replaces it, unset removes the "
        "variable). Use: eval \"$(uenvfs env NAME)\". The paths in meta/env.json are those "
        "of the mount point the image was built for (its 'mount' field, e.g. "
        "/user-environment); uenvfs serves the image at MOUNTPOINT/NAME instead, so every "
        "path under that mount point is rewritten to MOUNTPOINT/NAME. Software that has the "
        "build mount point compiled in (RPATHs, scripts) may still need the image there. "
        "${@VAR@} in a value becomes the shell's ${VAR-}. Unlike uenv, repeated entries of "
        "a list are not removed (the first one still wins a lookup). "
        "NAME is an image name or uenv label of the image sources (a repository's image is "
        "served under its id) or a path to an image file (then NAME is its file name without "
        ".sqfs).")
    p.epilog = IMAGE_EPILOG
    p.add_argument("name", metavar="NAME")
    p.add_argument("--view", help="the view (default: the one named 'default', else the "
                   "only one)")
    p.add_argument("--repo", action="append", metavar="DIR",
                   help="uenv repository (repeatable; replaces the configured ones)")

    p.add_argument("--images", action="append", metavar="DIR",
                   help="image directory (repeatable; replaces the configured ones)")
    p.add_argument("--config", metavar="FILE", help="configuration file "
                   "(default /etc/uenvfs.toml if it exists)")
    p.add_argument("--mountpoint", metavar="DIR", help="where uenvfs serves the images "
                   "(default: the configured one, /run/pact/uenv)")

    from .attach import add_attach
    from .run import add_commands

    add_commands(lambda name, help_text: add(name, help_text, _unreachable))
    add_attach(lambda name, help_text: add(name, help_text, _unreachable))

    for verb, kind in control.COMMANDS.items():
        run = admin.cmd_restart if kind is control.Restart else admin.cmd_control(kind)
        kind.add_arguments(add(verb, kind.help, run))
    return parser


RUN_COMMANDS = ("run", "start", "attach")  # client/run.py's and attach.py's: a lighter start


def _unreachable(args: argparse.Namespace) -> int:
    raise AssertionError("run and start are handled by run.main")


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] == "attach":  # it starts job steps: the short way
        from .attach import main as attach_main

        return attach_main(words)
    if words and words[0] in RUN_COMMANDS:  # so do these
        from .run import main as run_main

        return run_main(words)
    parser = build_parser()
    args = parser.parse_args(words)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"uenvfs {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    except BrokenPipeError:  # `uenvfs images | head`: the reader has gone; say nothing
        _quiet_stdout()
        return exits.BROKEN_PIPE
    except OSError as exc:
        print(f"uenvfs {args.command}: {exc.strerror or exc}", file=sys.stderr)
        return exits.FAILED if exc.errno != errno.ENOTCONN else exits.NO_DAEMON
    return code


if __name__ == "__main__":
    sys.exit(main())
