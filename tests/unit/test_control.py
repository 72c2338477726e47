"""The .control language: parsing, printing, usage and CLI forms of the commands (pure)."""

from __future__ import annotations

import argparse
import errno
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uenvfs.core.control import (
    COMMANDS,
    Acquire,
    Command,
    Emergency,
    Expire,
    ForceUnmount,
    HoldTime,
    Reconcile,
    Release,
    Reload,
    parse,
    parse_line,
)
from uenvfs.core.errors import CommandError


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("acquire pytorch-2.5 alloc-42", Acquire("pytorch-2.5", "alloc-42")),
        ("acquire img slurm-7 1000", Acquire("img", "slurm-7", 1000)),
        ("acquire img slurm-7 0", Acquire("img", "slurm-7", 0)),
        ("  release   slurm-7  ", Release("slurm-7")),
        ("release slurm-7 img", Release("slurm-7", "img")),
        ("reconcile --none", Reconcile()),
        ("reconcile", Reconcile()),  # the old spelling of --none, kept for .control
        ("reconcile a b c", Reconcile(("a", "b", "c"))),
        ("expire", Expire()),
        ("expire img", Expire("img")),
        ("hold-time 0.5", HoldTime(0.5)),
        ("hold-time 120 img", HoldTime(120.0, "img")),
        ("emergency on", Emergency(on=True)),
        ("emergency off", Emergency(on=False)),
        ("force-unmount img", ForceUnmount("img")),
        ("reload", Reload()),
    ],
)
def test_parse_line(line: str, command: Command) -> None:
    assert parse_line(line) == command
    assert parse_line(str(command)) == command  # str() gives back a parsable line


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("bad", "unknown command 'bad'"),
        ("acquire img", "usage: acquire NAME ALLOC"),
        ("acquire ../etc alloc", "invalid image name or uenv label"),
        ("acquire .hidden alloc", "invalid image name"),
        ("acquire img al/loc", "invalid allocation id"),
        ("acquire img a -1", "invalid uid '-1'"),
        ("acquire img a 4294967295", "invalid uid"),
        ("acquire img a 1e3", "invalid uid"),
        ("acquire img a \u0661", "invalid uid"),  # an Arabic-Indic digit one
        ("acquire img a 1 2", "usage: acquire NAME ALLOC [UID]"),
        ("release", "usage: release ALLOC [NAME]"),
        ("hold-time -1", "between 0 and"),
        ("hold-time nan", "between 0 and"),
        ("hold-time inf", "between 0 and"),
        ("hold-time soon", "not a number"),
        ("emergency maybe", "usage: emergency on|off"),
        ("force-unmount", "usage"),
        ("reload now", "usage: reload"),
        ("reconcile --none a", "allocations or --none, not both"),
        ("reconcile a --none", "allocations or --none, not both"),
        ("reconcile --all", "invalid allocation id '--all'"),
        ("expire a b", "usage"),
        ("x" * 5000, "longer than"),
    ],
)
def test_parse_line_rejects_with_a_reason(line: str, reason: str) -> None:
    with pytest.raises(CommandError, match=re.escape(reason)) as info:
        parse_line(line)
    assert info.value.errno == errno.EINVAL


def test_parse_several_lines_all_or_nothing() -> None:
    assert parse(b"expire\n\nreload\n") == [Expire(), Reload()]
    with pytest.raises(CommandError, match="unknown command"):
        parse(b"expire\nnonsense\n")
    for junk in (b"", b"\n\n", b"\xff\xfe", b"expire\0", b"a" * (64 * 1024 + 1)):
        with pytest.raises(CommandError):
            parse(junk)


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_parser_never_raises_anything_but_einval(data: bytes) -> None:
    try:
        commands = parse(data)
    except CommandError as exc:
        code = exc.errno
    else:
        assert commands
        return
    assert code == errno.EINVAL


def test_the_table_has_every_command_with_its_usage() -> None:
    assert {verb: kind.usage for verb, kind in COMMANDS.items()} == {
        "acquire": "acquire NAME ALLOC [UID]",
        "release": "release ALLOC [NAME]",
        "reconcile": "reconcile ALLOC... | --none",
        "expire": "expire [NAME]",
        "hold-time": "hold-time SECONDS [NAME]",
        "emergency": "emergency on|off",
        "force-unmount": "force-unmount NAME",
        "reload": "reload",
        "verify": "verify",
        "restart": "restart",
    }
    assert all(kind.verb == verb for verb, kind in COMMANDS.items())
    expected = ", ".join(COMMANDS)
    assert expected == ("acquire, release, reconcile, expire, hold-time, emergency, "
                        "force-unmount, reload, verify, restart")
    with pytest.raises(CommandError, match=f"expected one of: {expected}$"):
        parse_line("nosuch")


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["acquire", "img", "alloc-1"], "acquire img alloc-1"),
        (["release", "alloc-1"], "release alloc-1"),
        (["release", "alloc-1", "img"], "release alloc-1 img"),
        (["reconcile", "--none"], "reconcile --none"),
        (["reconcile", "a", "b"], "reconcile a b"),
        (["expire"], "expire"),
        (["hold-time", "0.30000001", "img"], "hold-time 0.30000001 img"),  # sent as typed
        (["emergency", "off"], "emergency off"),
        (["force-unmount", "img"], "force-unmount img"),
        (["reload"], "reload"),
    ],
)
def test_cli_arguments_give_the_line(argv: list[str], line: str) -> None:
    kind = COMMANDS[argv[0]]
    parser = argparse.ArgumentParser()
    kind.add_arguments(parser)
    assert kind.line_from(parser.parse_args(argv[1:])) == line


def test_the_cli_refuses_a_reconcile_without_allocations() -> None:
    """An empty list may be a `$(squeue ...)` that failed: releasing everything then would
    drop every job's acquisitions, so the empty form must be spelled --none."""
    parser = argparse.ArgumentParser()
    Reconcile.add_arguments(parser)
    with pytest.raises(CommandError, match="--none to release every allocation") as info:
        Reconcile.line_from(parser.parse_args([]))
    assert info.value.errno == errno.EINVAL
    line = Reconcile.line_from(parser.parse_args(["--none", "a"]))
    with pytest.raises(CommandError, match="not both"):
        parse_line(line)  # the CLI parses every line before it sends it
