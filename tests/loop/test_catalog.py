"""Image sources as autofs has them: map files, directories and a program map, in order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from uenvfs.image.catalog import Catalog, parse_map
from uenvfs.image.program_map import PROGRAM_BURST, PROGRAM_SHARE, ProgramBudget


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


async def test_a_user_may_keep_the_program_map_busy_only_for_its_share(tmp_path: Path) -> None:
    (tmp_path / "m.sqfs").write_bytes(b"x")
    calls = tmp_path / "calls"
    program = tmp_path / "lookup"
    program.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nsleep 0.3\n'
                       f'[ "$1" = real ] && echo {tmp_path}/m.sqfs\nexit 0\n')
    program.chmod(0o755)
    catalog = Catalog(program_map=program, program_timeout=5.0)
    nobody = 65534
    for n in range(12):  # random names: 12 x 0.3 s is more than the burst of 2 s
        assert await catalog.resolve(f"random{n}", nobody) is None
    asked = calls.read_text().split()
    assert 5 <= len(asked) <= 8, asked  # the burst, then nothing more for a while
    assert catalog.refused == 12 - len(asked)
    # Root (prologs, operators) and other users are not held back by nobody's spending.
    assert await catalog.resolve("real", 0) == tmp_path / "m.sqfs"
    assert await catalog.resolve("other", 1000) is None
    assert calls.read_text().split()[-2:] == ["real", "other"]


def test_the_share_refills_with_time_up_to_the_burst() -> None:
    budget = ProgramBudget(at=100.0)
    assert budget.seconds == PROGRAM_BURST
    budget.seconds = -0.3  # a call ran over what was left
    budget.refill(102.0)
    assert budget.seconds == pytest.approx(-0.3 + 2.0 * PROGRAM_SHARE)
    budget.refill(1000.0)
    assert budget.seconds == PROGRAM_BURST


async def test_sources_that_hang_are_given_up_in_time_and_tried_again_later(
    tmp_path: Path,
) -> None:
    # A map file that blocks its reader (a FIFO with no writer), standing in for a map file on
    # a hung NFS server.
    (tmp_path / "m.sqfs").write_bytes(b"x")
    listed = tmp_path / "listed.map"
    listed.write_text(f"kept {tmp_path}/m.sqfs\n")
    fifo = tmp_path / "hung.map"
    catalog = Catalog([tmp_path], [listed], source_timeout=0.3)
    catalog.refresh()
    assert catalog.listing() == {"m": tmp_path / "m.sqfs", "kept": tmp_path / "m.sqfs"}
    os.mkfifo(fifo)
    catalog.map_files = [listed, fifo]
    started = trio.current_time()
    assert await catalog.reread() is None  # given up: the listing is kept
    assert 0.3 <= trio.current_time() - started < 2
    assert catalog.listing() == {"m": tmp_path / "m.sqfs", "kept": tmp_path / "m.sqfs"}
    # While the call given up has not come back, nothing else waits for the sources.
    started = trio.current_time()
    assert await catalog.reread() is None
    assert await catalog.resolve("other") is None
    assert trio.current_time() - started < 0.1
    # The storage answers: the hung reader gets an empty map, and sources are read again.
    answer_reader(fifo)
    await trio.sleep(0.1)
    (tmp_path / "new.sqfs").write_bytes(b"x")
    assert await catalog.reread() is True
    assert "new" in catalog.listing()


def answer_reader(fifo: Path) -> None:
    """Let the reader blocked on *fifo* go (an empty file), and leave a plain empty file in
    its place."""
    with open(fifo, "w"):  # does not block: there is a reader
        fifo.unlink()
        fifo.write_text("")
