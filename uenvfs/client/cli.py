"""The `uenvfs` command: `serve` runs the daemon; every other subcommand talks to a running
daemon only through the files at its mount root (`.control`, `.status`, `.metrics`).

Exit codes: 0 success; 1 the daemon refused the command or failed (the message says why);
2 bad usage; 3 no uenvfs is serving at the mountpoint; 130 interrupted (Ctrl-C); 141 the reader
of the output went away. `run`, `start` and `attach` have their own (run.py).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..core import config as config_mod
from ..core import control, status
from ..core.errors import CommandError

if TYPE_CHECKING:
    from ..core.labels import Record
    from ..image.catalog import Catalog

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON = 0, 1, 2, 3
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
        raise CliError(f"configuration: {exc}", EXIT_USAGE) from exc
    from ..keeper.protocol import ENV_KEEPER
    from ..keeper.serve import serve as keep
    from ..keeper.serve import setup_logging

    if ENV_KEEPER in os.environ:  # started by the keeper: serve
        from ..server.daemon import serve

        return serve(cfg, lambda: config_mod.load(file, overrides))

    setup_logging(cfg.log_level)
    return keep()


def cmd_status(args: argparse.Namespace) -> int:
    if args.verify:
        send(args, str(control.Verify()))
    document = read_status(args)
    if args.verify:
        return _print_verify(document, args.json)
    if args.json:
        print(json.dumps(document, indent=1))
    else:
        print(status.format_table(document), end="")
        for entry in _this_process(args):
            views = ", ".join(str(view) for view in entry["views"]) or "none"
            print(f"this process sees {entry['name']} at {entry['mount_point']} "
                  f"(views applied: {views})")
    return EXIT_OK


def _this_process(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The images that this process sees bound at mount points (inside `uenvfs run` or
    `start`), with the views that UENV_VIEW says are applied there."""
    from .run import bound_here

    views = [entry.split(":") for entry in os.environ.get("UENV_VIEW", "").split(",")]
    return [{"name": b.name, "mount_point": b.mount_point,
             "views": [v[2] for v in views if len(v) == 3 and v[0] == b.mount_point]}
            for b in bound_here(_mountpoint(args))]


def _print_verify(document: dict[str, object], as_json: bool) -> int:
    """The differences of the daemon's counts from the processes; exit 1 if there are any."""
    verified = document.get("verify")
    if not isinstance(verified, dict):
        raise CliError("the daemon did not report a verification (an older uenvfs?)")
    differences = list(verified.get("differences", []))
    if as_json:
        print(json.dumps(verified, indent=1))
    elif differences:
        print("\n".join(differences))
    else:
        print("every count agrees with the processes")
    return EXIT_FAILED if differences else EXIT_OK


def cmd_metrics(args: argparse.Namespace) -> int:
    path = _root_file(args, ".metrics")
    sys.stdout.write(path.read_text())
    return EXIT_OK


# -- images, check, env: read the images directly, no daemon needed ----------------------------


def _image_config(args: argparse.Namespace) -> config_mod.Config:
    """The configuration, with the flags of `images` and `env` (--images, --mountpoint)."""
    overrides = {
        "images": tuple(Path(p) for p in args.images) if getattr(args, "images", None) else None,
        "repos": tuple(Path(p) for p in args.repo) if getattr(args, "repo", None) else None,
        "mountpoint": Path(args.mountpoint) if getattr(args, "mountpoint", None) else None,
    }
    config_file = getattr(args, "config", None)
    try:
        return config_mod.load(Path(config_file) if config_file else None, overrides)
    except config_mod.ConfigError as exc:
        raise CliError(f"configuration: {exc}", EXIT_USAGE) from exc


def _catalog(cfg: config_mod.Config, strict: bool) -> Catalog:
    """The image sources of *cfg*, read. *strict*: a missing image directory is an error,
    else it is skipped (it simply holds no image)."""
    from ..image import catalog as catalog_mod

    dirs = [d for d in cfg.images if d.is_dir()]
    missing = [d for d in cfg.images if d not in dirs]
    if strict and missing:
        raise CliError(f"image directory {missing[0]}: not a directory")
    catalog = catalog_mod.Catalog(image_dirs=dirs, map_files=cfg.maps,
                                  program_map=cfg.program_map,
                                  program_timeout=cfg.program_timeout, repos=cfg.repos,
                                  system=cfg.system, uarch=cfg.uarch)
    catalog.refresh()
    return catalog


def _find_image(text: str, file_first: bool,
                load_config: Callable[[], config_mod.Config]) -> tuple[str | None, Path]:
    """(image name, image path) for *text*: a path to an image file (starting with '/' or
    '.', or any existing file that is not an image's name; no name then), or an image name or
    uenv label resolved through the image sources as the daemon does. *file_first*: an
    existing file named *text* wins over an image name."""
    from ..core.labels import LabelError, parse_label
    from ..core.names import valid_name

    as_file = Path(text)
    if text.startswith(("/", ".")) or (file_first and as_file.is_file()):
        if not as_file.is_file():
            raise CliError(f"{text}: no such image file")
        return None, as_file
    try:
        is_label = valid_name(text) or bool(parse_label(text))
    except LabelError:
        is_label = False
    if is_label:
        import trio  # not at the top: the commands to the daemon need not pay for it

        catalog = _catalog(load_config(), strict=False)
        path = trio.run(catalog.resolve, text) if valid_name(text) else None
        if path is not None:
            return text, path
        try:
            name = catalog.label(text)
        except LabelError as exc:
            raise CliError(str(exc)) from exc
        if name is not None:
            return name, catalog.listing()[name]
    if as_file.is_file():
        return None, as_file
    raise CliError(f"{text}: no such image (not a name or uenv label that the image sources "
                   "know, nor an image file)")


def _image_rows(catalog: Catalog, cfg: config_mod.Config
                ) -> list[tuple[str, Path, Record | None]]:
    """(name as served, image file, repository record) of every image and label: an image
    of a repository is one row per label, named as the label is served."""
    from ..image.catalog import alias_name

    labels: dict[str, list[Record]] = {}
    for record in catalog.records():
        labels.setdefault(record.id, []).append(record)
    rows: list[tuple[str, Path, Record | None]] = []
    for name, path in sorted(catalog.listing().items()):
        for record in labels.get(name, []):
            alias = alias_name(record, cfg.system, cfg.uarch)
            rows.append((alias if catalog.alias(alias) == name else name, path, record))
        if name not in labels:
            rows.append((name, path, None))
    return rows


def cmd_images(args: argparse.Namespace) -> int:
    import trio

    from ..image.table import describe_images, format_images

    cfg = _image_config(args)
    catalog = _catalog(cfg, strict=True)
    infos = trio.run(describe_images, _image_rows(catalog, cfg))
    if args.json:
        print(json.dumps([info.as_json() for info in infos], indent=1))
    else:
        print(format_images(infos), end="")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    import time

    import trio

    from ..image.squashfs import ImageError, check_image, read_superblock
    from ..image.table import human_size

    _, path = _find_image(args.image, True, lambda: _image_config(args))
    started = time.monotonic()
    try:
        reason = trio.run(check_image, path, args.timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc)
    except ImageError as exc:  # rdsquashfs cannot run, or was killed after the timeout
        reason = str(exc)
    elapsed = time.monotonic() - started
    if reason is not None:
        raise CliError(f"{args.image}: {reason}")
    try:
        superblock = read_superblock(path)
    except ImageError as exc:  # replaced since the check
        raise CliError(f"{args.image}: {exc}") from exc
    print(f"{args.image}: ok ({superblock.inodes} inodes, {human_size(superblock.bytes_used)}"
          f", {superblock.compressor}, checked in {elapsed:.2f} s)")
    return EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    import trio

    from ..image.catalog import name_of
    from ..image.squashfs import ImageError, NotInImage
    from ..image.uenv import (
        ENV_JSON,
        choose_view,
        read_image_meta,
        shell_lines,
    )

    cfg = _image_config(args)
    name, path = _find_image(args.name, False, lambda: cfg)
    if name is None:  # an image file: served under its file name without the suffix
        name = name_of(path.name) or path.name
    try:
        uenv = trio.run(read_image_meta, path)
        view = choose_view(uenv, args.view)
    except NotInImage as exc:
        raise CliError(f"{args.name}: {path} has no {ENV_JSON}, so no views") from exc
    except ImageError as exc:
        raise CliError(f"{args.name}: {exc}") from exc
    if view.env is None:
        raise CliError(f"{args.name}: view {view.name!r} has no env section (it only has an "
                       "activation script, which uenvfs does not run)")
    if not uenv.mount:
        print(f"uenvfs env: warning: {ENV_JSON} of {args.name} names no mount point: "
              "paths are printed as they are", file=sys.stderr)
    for line in shell_lines(view.env, uenv.mount, str(cfg.mountpoint / name)):
        print(line)
    return EXIT_OK


RESTART_TIMEOUT = 120.0  # seconds `uenvfs restart` waits for the new server


def cmd_restart(args: argparse.Namespace) -> int:
    """`restart`, then wait until the new server answers (its pid in `.status`)."""
    import time

    before = _server(read_status(args))
    started = time.monotonic()
    send(args, str(control.Restart()))
    while time.monotonic() - started < RESTART_TIMEOUT:
        time.sleep(0.05)
        now = _server(read_status(args))
        if now and before and now["pid"] != before["pid"]:
            print(f"restarted: server pid {before['pid']} (uenvfs {before['version']}) -> "
                  f"pid {now['pid']} (uenvfs {now['version']})")
            return EXIT_OK
        error = now.get("restart_error")
        if error and error != before.get("restart_error"):
            raise CliError(f"restart failed: {error}; the old server goes on serving")
    raise CliError(f"no new server took over within {RESTART_TIMEOUT:g} s; the old one goes "
                   "on serving (the daemon's log says why)")


def _server(document: dict[str, object]) -> dict[str, object]:
    server = document.get("server")
    return server if isinstance(server, dict) else {}


def _command(kind: type[control.Command]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            line = kind.line_from(args)
            control.parse_line(line)  # catch a bad word here, with the reason, before sending
        except CommandError as exc:
            raise CliError(str(exc), EXIT_USAGE) from exc
        try:
            send(args, line)
        except CliError as exc:
            if kind is control.Release:
                exc.args = (str(exc) + _swapped(args),)
            raise
        return EXIT_OK

    return run


def _swapped(args: argparse.Namespace) -> str:
    """A hint when the words of `release ALLOC NAME` look swapped ("" if they do not)."""
    try:
        document = read_status(args)
    except CliError:
        return ""
    listed = document.get("mounts")
    mounts = [m for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []
    names = {m["name"] for m in mounts} | {label for m in mounts for label in m.get("labels", [])}
    allocs = {alloc for m in mounts for alloc in m.get("allocations", {})}
    if args.name in allocs and args.alloc in names and args.alloc not in allocs:
        return (f"; did you mean 'uenvfs release {args.name} {args.alloc}'? (release takes "
                "the allocation first)")
    return ""


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

    p = add("status", "show the mounted images, refcounts and hold timers", cmd_status)
    p.add_argument("--json", action="store_true", help="print the .status document")
    p.add_argument("--verify", action="store_true",
                   help="compare every count with a scan of the processes (open files, "
                        "mappings, programs, working directories) and print what differs; "
                        "exit 1 if anything does")
    add("metrics", "print .metrics (Prometheus text format)", cmd_metrics)

    p = add("images", "list the images of the image sources, with their uenv metadata",
            cmd_images, mountpoint=False)
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

    p = add("check", "validate an image without mounting it", cmd_check, mountpoint=False)
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

    p = add("env", "print the shell exports of a view of an image's meta/env.json", cmd_env,
            mountpoint=False)
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

    from .run import add_attach, add_commands

    add_commands(sub, lambda name, help_text: add(name, help_text, _unreachable))
    add_attach(lambda name, help_text: add(name, help_text, _unreachable))

    for verb, kind in control.COMMANDS.items():
        run = cmd_restart if kind is control.Restart else _command(kind)
        kind.add_arguments(add(verb, kind.help, run))
    return parser


RUN_COMMANDS = ("run", "start", "attach")  # run.py's own, with a lighter start


def _unreachable(args: argparse.Namespace) -> int:
    raise AssertionError("run and start are handled by run.main")


EXIT_BROKEN_PIPE = 128 + 13  # as a process killed by SIGPIPE: what shells report


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in RUN_COMMANDS:  # they start job steps: the short way
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
        return 130
    except BrokenPipeError:  # `uenvfs images | head`: the reader has gone; say nothing
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        print(f"uenvfs {args.command}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED if exc.errno != errno.ENOTCONN else EXIT_NO_DAEMON
    return code


if __name__ == "__main__":
    sys.exit(main())
