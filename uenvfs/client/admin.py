"""The subcommands that talk to a running daemon: `status`, `metrics`, `restart` and the
`.control` commands. They do so through the files at its mount root (`.control`, `.status`,
`.metrics`): a missing file means no uenvfs serves there (exit NO_DAEMON). Only to explain a
refused label (its candidates, which a write's errno cannot carry) do they ask the daemon's
query socket."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core import control, status
from ..core.errors import CommandError
from . import exits
from .ask import ambiguity, resolve
from .exits import CliError, RunError

RESTART_TIMEOUT = 120.0  # seconds `uenvfs restart` waits for the new server
EXPLAIN_TIMEOUT = 5.0  # seconds a refused command waits for the daemon to explain a label


def _mountpoint(args: argparse.Namespace) -> Path:
    return Path(args.mountpoint)


def _root_file(args: argparse.Namespace, name: str) -> Path:
    path = _mountpoint(args) / name
    if not path.exists():
        raise CliError(f"no uenvfs serving at {_mountpoint(args)} ({name} not found)",
                       exits.NO_DAEMON)
    return path


def send(args: argparse.Namespace, line: str) -> None:
    """Write one command to `.control`; the daemon's errno becomes the error message (with
    the candidates of an ambiguous label, `_explained`)."""
    write_control(_mountpoint(args), line, lambda exc: _explained(args, exc))


def write_control(mountpoint: Path, line: str,
                  explain: Callable[[OSError], str | None] | None = None) -> None:
    """Write one command to the `.control` of the uenvfs at *mountpoint* (CliError: the
    daemon's errno, with what *explain* says of it, or no uenvfs there)."""
    path = mountpoint / ".control"
    if not path.exists():
        raise CliError(f"no uenvfs serving at {mountpoint} (.control not found)",
                       exits.NO_DAEMON)
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from exc
    try:
        os.write(fd, (line + "\n").encode())
    except OSError as exc:
        why = (explain(exc) if explain else None) or "(the daemon's log has the details)"
        raise CliError(f"{line}: {exc.strerror} {why}") from exc
    finally:
        os.close(fd)


def _explained(args: argparse.Namespace, exc: OSError) -> str | None:
    """What the daemon says of the image name or label of a refused command (EINVAL): the
    candidates of an ambiguous label, as uenv lists them; None if nothing more to say."""
    name = getattr(args, "name", None)
    if exc.errno != errno.EINVAL or not isinstance(name, str):
        return None
    try:
        answer = resolve(_mountpoint(args), name, None, EXPLAIN_TIMEOUT)
    except RunError:
        return None
    found = ambiguity(name, answer)
    return None if found is None else f"({found})"


def read_status(args: argparse.Namespace) -> dict[str, object]:
    path = _root_file(args, ".status")
    try:
        document: dict[str, object] = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: {exc}") from exc
    return document


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
        for entry in _this_process(args, document):
            views = ", ".join(str(view) for view in entry["views"]) or "none"
            print(f"this process sees {entry['name']} at {entry['mount_point']} "
                  f"(views applied: {views})")
    return exits.OK


def _this_process(args: argparse.Namespace, document: dict[str, object]
                  ) -> list[dict[str, Any]]:
    """The images that this process sees bound at mount points (inside `uenvfs run` or
    `start`), with the views that UENV_VIEW says are applied there; *document* is `.status`
    (which has the devices of the images' kernel mounts)."""
    from .mounted import bound_here

    views = [entry.split(":") for entry in os.environ.get("UENV_VIEW", "").split(",")]
    return [{"name": b.name, "mount_point": b.mount_point,
             "views": [v[2] for v in views if len(v) == 3 and v[0] == b.mount_point]}
            for b in bound_here(_mountpoint(args), document)]


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
    return exits.FAILED if differences else exits.OK


def cmd_metrics(args: argparse.Namespace) -> int:
    path = _root_file(args, ".metrics")
    sys.stdout.write(path.read_text())
    return exits.OK


def cmd_restart(args: argparse.Namespace) -> int:
    """`restart`, then wait until the new server answers (its pid in `.status`)."""
    before = _server(read_status(args))
    started = time.monotonic()
    send(args, str(control.Restart()))
    while time.monotonic() - started < RESTART_TIMEOUT:
        time.sleep(0.05)
        now = _server(read_status(args))
        if now and before and now["pid"] != before["pid"]:
            print(f"restarted: server pid {before['pid']} (uenvfs {before['version']}) -> "
                  f"pid {now['pid']} (uenvfs {now['version']})")
            return exits.OK
        error = now.get("restart_error")
        if error and error != before.get("restart_error"):
            raise CliError(f"restart failed: {error}; the old server goes on serving")
    raise CliError(f"no new server took over within {RESTART_TIMEOUT:g} s; the old one goes "
                   "on serving (the daemon's log says why)")


def _server(document: dict[str, object]) -> dict[str, object]:
    server = document.get("server")
    return server if isinstance(server, dict) else {}


def cmd_control(kind: type[control.Command]) -> Callable[[argparse.Namespace], int]:
    """The subcommand that writes the `.control` command *kind* (all but `restart`)."""

    def run(args: argparse.Namespace) -> int:
        try:
            line = kind.line_from(args)
            control.parse_line(line)  # catch a bad word here, with the reason, before sending
        except CommandError as exc:
            raise CliError(str(exc), exits.USAGE) from exc
        try:
            send(args, line)
        except CliError as exc:
            if kind is control.Release:
                exc.args = (str(exc) + _swapped(args),)
            raise
        return exits.OK

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
