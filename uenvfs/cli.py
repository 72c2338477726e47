"""The `uenvfs` command: `serve` runs the daemon; every other subcommand talks to a running
daemon only through the files at its mount root (`.control`, `.status`, `.metrics`).

Exit codes: 0 success; 1 the daemon refused the command or failed (the message says why);
2 bad usage; 3 no uenvfs is serving at the mountpoint.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import config as config_mod
from . import control
from .errors import CommandError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3

EPILOG = """exit codes: 0 success; 1 the daemon refused the command or failed (the one-line
message says why: 'Invalid argument', 'No such file or directory', 'Operation not permitted',
'Permission denied', 'Input/output error'); 2 bad usage; 3 no uenvfs serving at the mountpoint"""


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _mountpoint(args: argparse.Namespace) -> Path:
    return Path(args.mountpoint)


def _root_file(args: argparse.Namespace, name: str) -> Path:
    path = _mountpoint(args) / name
    if not path.exists():
        raise CliError(f"no uenvfs serving at {_mountpoint(args)} ({name} not found)",
                       EXIT_NO_DAEMON)
    return path


def send(args: argparse.Namespace, line: str) -> None:
    """Write one command to `.control`; the daemon's errno becomes the error message."""
    path = _root_file(args, ".control")
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from exc
    try:
        os.write(fd, (line + "\n").encode())
    except OSError as exc:
        raise CliError(f"{line}: {exc.strerror} (the daemon's log has the details)") from exc
    finally:
        os.close(fd)


def read_status(args: argparse.Namespace) -> dict[str, object]:
    path = _root_file(args, ".status")
    try:
        document: dict[str, object] = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: {exc}") from exc
    return document


# -- subcommands ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import serve  # imports pyfuse3: only the daemon needs it

    overrides = {
        "mountpoint": Path(args.mountpoint) if args.mountpoint else None,
        "images": tuple(Path(p) for p in args.images) if args.images else None,
        "maps": tuple(Path(p) for p in args.map) if args.map else None,
        "program_map": Path(args.program_map) if args.program_map else None,
        "hold_time": args.hold_time,
        "state_dir": Path(args.state_dir) if args.state_dir else None,
        "backend": args.backend,
        "log_level": args.log_level,
    }
    try:
        cfg = config_mod.load(Path(args.config) if args.config else None, overrides)
    except config_mod.ConfigError as exc:
        raise CliError(f"configuration: {exc}", EXIT_USAGE) from exc
    return serve(cfg)


def cmd_status(args: argparse.Namespace) -> int:
    document = read_status(args)
    if args.json:
        print(json.dumps(document, indent=1))
    else:
        print(control.format_table(document), end="")
    return EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    path = _root_file(args, ".metrics")
    sys.stdout.write(path.read_text())
    return EXIT_OK


def _command(build: Callable[[argparse.Namespace], str]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        line = build(args)
        try:
            control.parse_line(line)  # catch a bad word here, with the reason, before sending
        except CommandError as exc:
            raise CliError(str(exc), EXIT_USAGE) from exc
        send(args, line)
        return EXIT_OK

    return run


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], str]]] = {
    "acquire": ("ALLOC uses NAME (mounting it) until released",
                lambda a: f"acquire {a.name} {a.alloc}"),
    "release": ("ALLOC stops using NAME (or every image)",
                lambda a: f"release {a.alloc} {a.name or ''}".strip()),
    "reconcile": ("the given allocations are all that live: release every other one",
                  lambda a: " ".join(["reconcile", *a.allocs])),
    "expire": ("unmount now every idle image (or NAME)",
               lambda a: f"expire {a.name or ''}".strip()),
    "hold-time": ("set the hold time, globally or for NAME",
                  lambda a: f"hold-time {a.seconds} {a.name or ''}".strip()),
    "emergency": ("enter or leave emergency mode", lambda a: f"emergency {a.mode}"),
    "force-unmount": ("emergency mode only: unmount NAME whatever its refcount",
                      lambda a: f"force-unmount {a.name}"),
    "reload": ("re-read the image sources", lambda a: "reload"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uenvfs", description="Lazy-mounting FUSE filesystem for uenv SquashFS images.",
        epilog=EPILOG,
    )
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
    p.add_argument("--program-map", metavar="EXE", help="program map")
    p.add_argument("--hold-time", type=float, metavar="SECONDS",
                   help="unmount this long after the last use (default 60)")
    p.add_argument("--state-dir", metavar="DIR", help="journal and backing mounts "
                   "(default /run/pact/uenvfs)")
    p.add_argument("--backend", choices=config_mod.BACKENDS)
    p.add_argument("--config", metavar="FILE", help="configuration file "
                   "(default /etc/uenvfs.toml if it exists)")
    p.add_argument("--log-level", choices=config_mod.LOG_LEVELS)

    p = add("status", "show the mounted images, refcounts and hold timers", cmd_status)
    p.add_argument("--json", action="store_true", help="print the .status document")
    add("metrics", "print .metrics (Prometheus text format)", cmd_metrics)

    for name, (help_text, build) in COMMANDS.items():
        p = add(name, help_text, _command(build))
        if name == "acquire":
            p.add_argument("name")
            p.add_argument("alloc")
        elif name == "release":
            p.add_argument("alloc")
            p.add_argument("name", nargs="?")
        elif name == "reconcile":
            p.add_argument("allocs", nargs="*", metavar="ALLOC")
        elif name in ("expire",):
            p.add_argument("name", nargs="?")
        elif name == "hold-time":
            p.add_argument("seconds")
            p.add_argument("name", nargs="?")
        elif name == "emergency":
            p.add_argument("mode", choices=("on", "off"))
        elif name == "force-unmount":
            p.add_argument("name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"uenvfs {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"uenvfs {args.command}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED if exc.errno != errno.ENOTCONN else EXIT_NO_DAEMON
    return code


if __name__ == "__main__":
    sys.exit(main())
