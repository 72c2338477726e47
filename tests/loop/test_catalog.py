"""Image sources as autofs has them: map files, directories and a program map, in order."""

from __future__ import annotations

from pathlib import Path

from uenvfs.catalog import Catalog, parse_map


def test_parse_map_file() -> None:
    text = """# site map
pytorch-2.5   /sw/images/pytorch-2.5.sqfs   # the current one
tools /sw/tools.squashfs
bad line with words
relative  images/x.sqfs
.hidden /sw/h.sqfs
pytorch-2.5 /sw/other.sqfs
"""
    assert parse_map(text) == {"pytorch-2.5": Path("/sw/images/pytorch-2.5.sqfs"),
                               "tools": Path("/sw/tools.squashfs")}


async def test_first_source_wins_and_program_map_is_asked_last(tmp_path: Path) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    for d in (d1, d2):
        d.mkdir()
        (d / "both.sqfs").write_bytes(b"x")
    (d2 / "second.squashfs").write_bytes(b"x")
    (tmp_path / "m.sqfs").write_bytes(b"x")
    map_file = tmp_path / "site.map"
    map_file.write_text(f"both {tmp_path}/m.sqfs\nmapped {tmp_path}/m.sqfs\n")
    program = tmp_path / "lookup"
    program.write_text(f'#!/bin/sh\n[ "$1" = asked ] && echo {tmp_path}/m.sqfs\n')
    program.chmod(0o755)
    catalog = Catalog([d1, d2], [map_file], program)
    catalog.refresh()
    assert catalog.listing() == {"both": d1 / "both.sqfs", "second": d2 / "second.squashfs",
                                 "mapped": tmp_path / "m.sqfs"}
    assert await catalog.resolve("asked") == tmp_path / "m.sqfs"
    assert await catalog.resolve("nothing") is None
    assert await catalog.resolve("../etc") is None
