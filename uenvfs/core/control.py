"""The `.control` command language: one type per command, and the table of them.

Pure: no trio, no pyfuse3. A command line is words separated by blanks:

    acquire NAME ALLOC [UID]  release ALLOC [NAME]      reconcile ALLOC... | --none
    expire [NAME]             hold-time SECONDS [NAME]  emergency on|off
    force-unmount NAME        reload                    verify
    restart

Anything else is EINVAL with a reason that says what was expected.

A command is a class of `COMMANDS`, made by `@command(verb, help)`: a frozen dataclass whose
fields are its words, in order. Each field's `Word` says how the word reads and prints; a field
without a default is a required word, a default of None makes it optional, a default of ()
makes it take every remaining word. From that the class derives its parser, its line (`str`),
its usage and its CLI arguments, so adding a command is one class here, plus its handler in
`executor`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar, Literal, Self, TypeVar, dataclass_transform

from .errors import CommandError
from .labels import LabelError, parse_label
from .names import valid_alloc, valid_name
from .owners import MAX_UID

log = logging.getLogger(__name__)

MAX_WRITE = 64 * 1024
MAX_LINE = 4096


def _invalid(message: str) -> CommandError:
    return CommandError(errno.EINVAL, message)


# -- words -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Word:
    """One kind of word of a command line.

    `read` returns the word's value; it raises `CommandError` (EINVAL) with a reason, or
    ValueError when the only thing to say is the command's usage.
    """

    metavar: str  # in the usage line
    read: Callable[[str], Any]
    show: Callable[[Any], str] = str  # back to the word: str(command) parses to an equal one
    choices: tuple[str, ...] | None = None  # for the CLI
    dest: str | None = None  # the CLI argument's name, if not the field's

    @property
    def meta(self) -> Mapping[str, Word]:
        """The `field(metadata=...)` of a command field made of this word."""
        return {"word": self}


def _name(word: str) -> str:
    """An image name, or a uenv label (name/version:tag@system%uarch, sha256 or id)."""
    if not valid_name(word):
        try:
            parse_label(word)
        except LabelError:
            raise _invalid(f"invalid image name or uenv label {word!r}") from None
    return word


def _alloc(word: str) -> str:
    if not valid_alloc(word):
        raise _invalid(f"invalid allocation id {word!r}")
    return word


def _uid(word: str) -> int:
    if not word.isascii() or not word.isdigit() or int(word) > MAX_UID:
        raise _invalid(f"invalid uid {word!r}: a number from 0 to {MAX_UID}")
    return int(word)


def _seconds(word: str) -> float:
    try:
        value = float(word)
    except ValueError:
        raise _invalid(f"hold time {word!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or value > 10**9:
        raise _invalid(f"hold time {word!r} must be between 0 and 1e9 seconds")
    return value


def _on_off(word: str) -> bool:
    if word not in ("on", "off"):
        raise ValueError(word)
    return word == "on"


NAME = Word("NAME", _name)
ALLOC = Word("ALLOC", _alloc)
UID = Word("UID", _uid)
SECONDS = Word("SECONDS", _seconds, show=lambda seconds: f"{seconds:g}")
ON_OFF = Word("on|off", _on_off, show=lambda on: "on" if on else "off", choices=("on", "off"),
              dest="mode")


@dataclass(frozen=True)
class Param:
    """One field of a command: its word, and how many it takes (argparse's nargs)."""

    field: str
    word: Word
    nargs: Literal["?", "*"] | None  # None: exactly one


# -- commands ----------------------------------------------------------------------------------


class Command:
    """A parsed `.control` command: one subclass per verb, each registered with `@command`.

    Invariant: `parse_line(str(command)) == command`.
    """

    verb: ClassVar[str]  # the class attributes are set by @command
    help: ClassVar[str]  # one line, for the CLI
    params: ClassVar[tuple[Param, ...]]  # from the dataclass fields
    usage: ClassVar[str]  # "release ALLOC [NAME]"
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # every command is a dataclass

    @classmethod
    def from_words(cls, args: Sequence[str]) -> Self:
        """The command of the words after the verb. Raises `CommandError` (EINVAL)."""
        required = sum(param.nargs is None for param in cls.params)
        rest = any(param.nargs == "*" for param in cls.params)
        if len(args) < required or (not rest and len(args) > len(cls.params)):
            raise _invalid(f"usage: {cls.usage}")
        values: dict[str, Any] = {}
        try:
            for i, param in enumerate(cls.params):
                if param.nargs == "*":
                    values[param.field] = tuple(map(param.word.read, args[i:]))
                elif i < len(args):
                    values[param.field] = param.word.read(args[i])
        except ValueError:
            raise _invalid(f"usage: {cls.usage}") from None
        return cls(**values)

    def __str__(self) -> str:
        """The line that writes this command to `.control`."""
        words = [self.verb]
        for param in self.params:
            value = getattr(self, param.field)
            if param.nargs == "*":
                words += map(param.word.show, value)
            elif value is not None:
                words.append(param.word.show(value))
        return " ".join(words)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The CLI's arguments of the command (`uenvfs VERB ...`)."""
        for param in cls.params:
            options: dict[str, Any] = {}
            if param.nargs is not None:
                options["nargs"] = param.nargs
            if param.nargs == "*":
                options["metavar"] = param.word.metavar  # "[ALLOC ...]", not "[allocs ...]"
            if param.word.choices is not None:
                options["choices"] = param.word.choices
            parser.add_argument(param.word.dest or param.field, **options)

    @classmethod
    def line_from(cls, args: argparse.Namespace) -> str:
        """The line of the CLI's arguments, word for word as given (not parsed yet)."""
        words = [cls.verb]
        for param in cls.params:
            value = getattr(args, param.word.dest or param.field)
            if isinstance(value, list):
                words += value
            elif value is not None:
                words.append(value)
        return " ".join(words).strip()


COMMANDS: dict[str, type[Command]] = {}  # by verb, in the order usage messages list them


C = TypeVar("C", bound=Command)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def command(verb: str, help: str) -> Callable[[type[C]], type[C]]:
    """Make the decorated class a frozen dataclass and the command *verb* of `COMMANDS`."""

    def register(cls: type[C]) -> type[C]:
        cls = dataclass(frozen=True)(cls)
        params = []
        for f in fields(cls):
            nargs: Literal["?", "*"] | None = (
                None if f.default is MISSING else "?" if f.default is None else "*")
            params.append(Param(f.name, f.metadata["word"], nargs))
        assert all(p.nargs != "*" for p in params[:-1]), "only the last field takes the rest"
        usage = [verb]
        for param in params:
            metavar = param.word.metavar
            usage.append({None: metavar, "?": f"[{metavar}]", "*": f"[{metavar} ...]"}[param.nargs])
        cls.verb, cls.help, cls.params, cls.usage = verb, help, tuple(params), " ".join(usage)
        COMMANDS[verb] = cls
        return cls

    return register


@command("acquire", "ALLOC (the job of user UID, if given) uses NAME (mounting it) until "
         "released")
class Acquire(Command):
    name: str = field(metadata=NAME.meta)
    alloc: str = field(metadata=ALLOC.meta)
    uid: int | None = field(default=None, metadata=UID.meta)


@command("release", "ALLOC stops using NAME (or every image)")
class Release(Command):
    alloc: str = field(metadata=ALLOC.meta)
    name: str | None = field(default=None, metadata=NAME.meta)


@command("reconcile", "the given allocations are all that live: release every other one "
         "(--none: no allocation lives: release them all)")
class Reconcile(Command):
    """`reconcile ALLOC...` or `reconcile --none`. The empty form is spelled out, since a
    command substitution that failed (`reconcile $(squeue ...)`) would otherwise release every
    allocation on the node. A bare `reconcile` line in `.control` keeps its old meaning,
    `--none`, for scripts written against it; the CLI refuses it."""

    allocs: tuple[str, ...] = field(default=(), metadata=ALLOC.meta)

    NONE: ClassVar[str] = "--none"

    @classmethod
    def from_words(cls, args: Sequence[str]) -> Self:
        if list(args) == [cls.NONE]:
            return cls()
        if cls.NONE in args:
            raise _invalid("reconcile takes allocations or --none, not both")
        if not args:
            log.warning("a bare 'reconcile' releases every allocation on the node; write "
                        "'reconcile --none' for that (an empty list may be a command that "
                        "failed)")
        return super().from_words(args)

    def __str__(self) -> str:
        return super().__str__() if self.allocs else f"{self.verb} {self.NONE}"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument(cls.NONE, action="store_true", dest="none",
                            help="no allocation lives: release every allocation on the node "
                                 "(its acquisitions and the open files counted for it)")

    @classmethod
    def line_from(cls, args: argparse.Namespace) -> str:
        if args.none:
            return f"{cls.verb} {cls.NONE}" + "".join(f" {a}" for a in args.allocs)
        if not args.allocs:
            raise _invalid(f"reconcile needs the live allocations, or {cls.NONE} to release "
                           "every allocation on the node (an empty list is refused: it may "
                           "be a command that failed)")
        return super().line_from(args)


@command("expire", "unmount now every idle image (or NAME)")
class Expire(Command):
    name: str | None = field(default=None, metadata=NAME.meta)


@command("hold-time", "set the hold time, globally or for NAME")
class HoldTime(Command):
    seconds: float = field(metadata=SECONDS.meta)
    name: str | None = field(default=None, metadata=NAME.meta)


@command("emergency", "enter or leave emergency mode")
class Emergency(Command):
    on: bool = field(metadata=ON_OFF.meta)


@command("force-unmount", "emergency mode only: unmount NAME whatever its refcount")
class ForceUnmount(Command):
    name: str = field(metadata=NAME.meta)


@command("reload", "re-read the configuration file (what can change live) and the image "
         "sources")
class Reload(Command):
    pass


@command("verify", "compare every count with a scan of the processes (see .status)")
class Verify(Command):
    pass


@command("restart", "hand the FUSE connection to a new server started from the installed "
         "code, keeping every mount, count and timer (jobs notice nothing)")
class Restart(Command):
    pass


Reconcile.usage = f"reconcile ALLOC... | {Reconcile.NONE}"


# -- parsing -----------------------------------------------------------------------------------


def parse_line(line: str) -> Command:
    """Parse one command line. Raises `CommandError` (EINVAL) with the reason."""
    if len(line) > MAX_LINE:
        raise _invalid(f"line longer than {MAX_LINE} characters")
    words = line.split()
    if not words:
        raise _invalid("empty command")
    kind = COMMANDS.get(words[0])
    if kind is None:
        verb = words[0]
        shown = verb if len(verb) <= 40 else verb[:40] + "..."
        raise _invalid(f"unknown command {shown!r}; expected one of: {', '.join(COMMANDS)}")
    return kind.from_words(words[1:])


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
