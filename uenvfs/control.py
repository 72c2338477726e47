"""The `.control` command language and the `.status` document, shared by daemon and CLI.

Pure: no trio, no pyfuse3. A command line is words separated by blanks:

    acquire NAME ALLOC        release ALLOC [NAME]      reconcile [ALLOC ...]
    expire [NAME]             hold-time SECONDS [NAME]  emergency on|off
    force-unmount NAME        reload

Anything else is EINVAL with a reason that says what was expected.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CommandError
from .names import valid_alloc, valid_name

STATUS_VERSION = 1
MAX_WRITE = 64 * 1024
MAX_LINE = 4096

USAGE = {
    "acquire": "acquire NAME ALLOC",
    "release": "release ALLOC [NAME]",
    "reconcile": "reconcile [ALLOC ...]",
    "expire": "expire [NAME]",
    "hold-time": "hold-time SECONDS [NAME]",
    "emergency": "emergency on|off",
    "force-unmount": "force-unmount NAME",
    "reload": "reload",
}


@dataclass(frozen=True)
class Command:
    """One parsed `.control` command. Which fields are set depends on the verb."""

    verb: str
    name: str | None = None
    alloc: str | None = None
    allocs: tuple[str, ...] = ()
    seconds: float | None = None
    on: bool | None = None

    def __str__(self) -> str:
        words: list[str] = [self.verb]
        if self.verb == "acquire":
            words += [str(self.name), str(self.alloc)]
        elif self.verb == "release":
            words += [str(self.alloc)] + ([self.name] if self.name else [])
        elif self.verb == "reconcile":
            words += list(self.allocs)
        elif self.verb == "hold-time":
            words += [f"{self.seconds:g}"] + ([self.name] if self.name else [])
        elif self.verb == "emergency":
            words.append("on" if self.on else "off")
        elif self.name:
            words.append(self.name)
        return " ".join(words)


def _invalid(message: str) -> CommandError:
    return CommandError(errno.EINVAL, message)


def _name(word: str) -> str:
    if not valid_name(word):
        raise _invalid(f"invalid image name {word!r}")
    return word


def _alloc(word: str) -> str:
    if not valid_alloc(word):
        raise _invalid(f"invalid allocation id {word!r}")
    return word


def _seconds(word: str) -> float:
    try:
        value = float(word)
    except ValueError:
        raise _invalid(f"hold time {word!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or value > 10**9:
        raise _invalid(f"hold time {word!r} must be between 0 and 1e9 seconds")
    return value


def parse_line(line: str) -> Command:
    """Parse one command line. Raises `CommandError` (EINVAL) with the reason."""
    if len(line) > MAX_LINE:
        raise _invalid(f"line longer than {MAX_LINE} characters")
    words = line.split()
    if not words:
        raise _invalid("empty command")
    verb, args = words[0], words[1:]
    n = len(args)

    def arity(low: int, high: int | None) -> None:
        if n < low or (high is not None and n > high):
            raise _invalid(f"usage: {USAGE[verb]}")

    if verb == "acquire":
        arity(2, 2)
        return Command(verb, name=_name(args[0]), alloc=_alloc(args[1]))
    if verb == "release":
        arity(1, 2)
        return Command(verb, alloc=_alloc(args[0]), name=_name(args[1]) if n == 2 else None)
    if verb == "reconcile":
        return Command(verb, allocs=tuple(_alloc(a) for a in args))
    if verb == "expire":
        arity(0, 1)
        return Command(verb, name=_name(args[0]) if n else None)
    if verb == "hold-time":
        arity(1, 2)
        return Command(verb, seconds=_seconds(args[0]), name=_name(args[1]) if n == 2 else None)
    if verb == "emergency":
        arity(1, 1)
        if args[0] not in ("on", "off"):
            raise _invalid(f"usage: {USAGE[verb]}")
        return Command(verb, on=args[0] == "on")
    if verb == "force-unmount":
        arity(1, 1)
        return Command(verb, name=_name(args[0]))
    if verb == "reload":
        arity(0, 0)
        return Command(verb)
    shown = verb if len(verb) <= 40 else verb[:40] + "..."
    raise _invalid(f"unknown command {shown!r}; expected one of: {', '.join(USAGE)}")


def parse(data: bytes) -> list[Command]:
    """Parse what a caller wrote to `.control`: one command per line, blank lines ignored.

    Every line is parsed before any is applied, so a write with a malformed line changes
    nothing.
    """
    if len(data) > MAX_WRITE:
        raise _invalid(f"write longer than {MAX_WRITE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"not UTF-8 text (byte {exc.start})") from None
    if "\0" in text:
        raise _invalid("NUL byte in command")
    commands = [parse_line(line) for line in text.splitlines() if line.strip()]
    if not commands:
        raise _invalid("empty command")
    return commands


# -- .status -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MountStatus:
    """One image as `.status` lists it."""

    name: str
    image_path: str
    mount_point: str
    backing: str
    state: str
    refcount: int
    allocations: Mapping[str, tuple[int, bool]] = field(default_factory=dict)
    hold_remaining: float | None = None
    mounted_at: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image_path": self.image_path,
            "mount_point": self.mount_point,
            "backing": self.backing,
            "state": self.state,
            "refcount": self.refcount,
            "allocations": {
                alloc: {"opens": opens, "acquired": acquired}
                for alloc, (opens, acquired) in sorted(self.allocations.items())
            },
            "hold_remaining": (
                None if self.hold_remaining is None else round(self.hold_remaining, 3)
            ),
            "mounted_at": self.mounted_at,
            "error": self.error,
        }


def status_document(
    mountpoint: str, hold_time: float, emergency: bool, mounts: Sequence[MountStatus]
) -> dict[str, Any]:
    return {
        "version": STATUS_VERSION,
        "mountpoint": mountpoint,
        "hold_time": hold_time,
        "emergency": emergency,
        "mounts": [m.to_json() for m in sorted(mounts, key=lambda m: m.name)],
    }


def render_status(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, indent=1) + "\n").encode()


def format_table(document: Mapping[str, Any]) -> str:
    """The `.status` document as a table for people (`uenvfs status`)."""
    head = (
        f"uenvfs at {document['mountpoint']}: hold time {document['hold_time']:g} s"
        + (", EMERGENCY MODE" if document.get("emergency") else "")
    )
    mounts = document.get("mounts", [])
    if not mounts:
        return head + "\nno image mounted\n"
    rows = [("NAME", "STATE", "REFS", "HOLD", "ALLOCATIONS", "ERROR")]
    for m in mounts:
        allocs = ",".join(
            f"{a}({u['opens']}{'+acq' if u['acquired'] else ''})"
            for a, u in m["allocations"].items()
        )
        hold = "" if m["hold_remaining"] is None else f"{m['hold_remaining']:.0f}s"
        rows.append((m["name"], m["state"], str(m["refcount"]), hold, allocs or "-",
                     m["error"] or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
             for r in rows]
    return head + "\n" + "\n".join(line.rstrip() for line in lines) + "\n"
