"""The exit codes of the `uenvfs` command are an interface (scripts, the Slurm prolog): the
table in client/exits.py keeps the numbers that docs/interface.md lists."""

from __future__ import annotations

import pathlib
import re

from uenvfs.client import exits

INTERFACE = pathlib.Path(__file__).parents[2] / "docs" / "interface.md"


def test_the_numbers_are_those_of_the_interface() -> None:
    assert (exits.OK, exits.FAILED, exits.USAGE, exits.NO_DAEMON) == (0, 1, 2, 3)
    assert (exits.RUN_FAILED, exits.CANNOT_EXECUTE, exits.NOT_FOUND) == (125, 126, 127)
    assert (exits.INTERRUPTED, exits.BROKEN_PIPE) == (130, 141)
    table = INTERFACE.read_text().partition("\nExit codes:\n")[2].partition("\n\n")[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    names = [name for name in dir(exits) if name.isupper()]
    assert {getattr(exits, name) for name in names} == documented
