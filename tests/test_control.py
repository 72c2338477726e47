"""The .control language and the .status document (pure)."""

from __future__ import annotations

import errno
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uenvfs.control import (
    Command,
    MountStatus,
    format_table,
    parse,
    parse_line,
    render_status,
    status_document,
)
from uenvfs.errors import CommandError


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("acquire pytorch-2.5 alloc-42", Command("acquire", name="pytorch-2.5", alloc="alloc-42")),
        ("  release   slurm-7  ", Command("release", alloc="slurm-7")),
        ("release slurm-7 img", Command("release", alloc="slurm-7", name="img")),
        ("reconcile", Command("reconcile")),
        ("reconcile a b c", Command("reconcile", allocs=("a", "b", "c"))),
        ("expire", Command("expire")),
        ("expire img", Command("expire", name="img")),
        ("hold-time 0.5", Command("hold-time", seconds=0.5)),
        ("hold-time 120 img", Command("hold-time", seconds=120.0, name="img")),
        ("emergency on", Command("emergency", on=True)),
        ("emergency off", Command("emergency", on=False)),
        ("force-unmount img", Command("force-unmount", name="img")),
        ("reload", Command("reload")),
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
        ("acquire ../etc alloc", "invalid image name"),
        ("acquire .hidden alloc", "invalid image name"),
        ("acquire img al/loc", "invalid allocation id"),
        ("release", "usage: release ALLOC [NAME]"),
        ("hold-time -1", "between 0 and"),
        ("hold-time nan", "between 0 and"),
        ("hold-time inf", "between 0 and"),
        ("hold-time soon", "not a number"),
        ("emergency maybe", "usage: emergency on|off"),
        ("force-unmount", "usage"),
        ("reload now", "usage: reload"),
        ("expire a b", "usage"),
        ("x" * 5000, "longer than"),
    ],
)
def test_parse_line_rejects_with_a_reason(line: str, reason: str) -> None:
    with pytest.raises(CommandError, match=re.escape(reason)) as info:
        parse_line(line)
    assert info.value.errno == errno.EINVAL


def test_parse_several_lines_all_or_nothing() -> None:
    assert parse(b"expire\n\nreload\n") == [Command("expire"), Command("reload")]
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


def test_status_document_and_table() -> None:
    mounts = [
        MountStatus("zeta", "/images/zeta.sqfs", "/run/pact/uenv/zeta", "/s/mnt/zeta", "holding",
                    0, {}, 12.3456, "2026-11-30T06:00:00Z", None),
        MountStatus("alpha", "/images/alpha.sqfs", "/run/pact/uenv/alpha", "/s/mnt/alpha",
                    "mounted", 2, {"slurm-7": (0, True), "alloc-42": (3, False)}, None,
                    "2026-11-30T06:00:00Z", None),
    ]
    doc = json.loads(render_status(status_document("/run/pact/uenv", 60.0, False, mounts)))
    assert doc["version"] == 1
    assert [m["name"] for m in doc["mounts"]] == ["alpha", "zeta"]
    assert doc["mounts"][0]["allocations"] == {
        "alloc-42": {"opens": 3, "acquired": False}, "slurm-7": {"opens": 0, "acquired": True}}
    assert doc["mounts"][1]["hold_remaining"] == 12.346
    assert set(doc["mounts"][0]) == {"name", "image_path", "mount_point", "backing", "state",
                                     "refcount", "allocations", "hold_remaining", "mounted_at",
                                     "error"}
    table = format_table(doc)
    assert "alpha  mounted  2" in table
    assert "alloc-42(3),slurm-7(0+acq)" in table
    assert "zeta   holding  0     12s" in table
