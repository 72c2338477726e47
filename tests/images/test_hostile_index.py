"""A hostile uenv index (anyone who can write a repository can write its index.db): records
outside uenv's characters are refused, each named by its row; a read is bounded in rows,
bytes and time, and stops by itself when nobody waits for it any more (issue 27)."""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import pytest
import trio

from uenvfs.image import repository
from uenvfs.image.catalog import Catalog

from ..uenv_repos import RECORDS, Pulled, make_repository, replace_records

GOOD = Pulled(b"gnu 24.11", "2024-11-20 10:00:00", "daint", "gh200", "prgenv-gnu", "24.11",
              ("v1",))
SHA, ID = GOOD.sha256, GOOD.sha256[:16]


def row(system: str = "'daint'", uarch: str = "'gh200'", name: str = "'evil'",
        version: str = "'1.0'", tag: str = "'v1'", date: str = "'2024-12-01'",
        size: str = "1", sha256: str = f"'{SHA}'", id_: str = f"'{ID}'") -> str:
    """One row of `records`, each column an SQL expression; the image is GOOD's."""
    values = (system, uarch, name, version, tag, date, size, sha256, id_)
    return "SELECT " + ", ".join(f"{value} AS {column}"
                                 for value, column in zip(values, repository.COLUMNS, strict=True))


# rows that never end: the recursive CTE yields one row after another
ENDLESS = ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
           + row(name="'endless' || n", tag="'v' || n") + " FROM r")
# rows that never come: SQLite counts forever, in constant memory
SILENT = ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
          + row() + " FROM r WHERE n < 0")
# rows that never come while SQLite's memory grows: UNION keeps every row it saw, to drop
# duplicates, each of a kilobyte here
GROWING = ("WITH RECURSIVE r(n, pad) AS (SELECT 1, zeroblob(1000) UNION SELECT n + 1, pad "
           "FROM r) " + row() + " FROM r WHERE n < 0")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repository(tmp_path / "repo", [GOOD])


def test_records_outside_uenvs_characters_are_refused_by_row(repo: Path) -> None:
    bad = {  # column: (SQL value, how the problem names it)
        "id_": ("'0123456789/abcde'", "bad id '0123456789/abcde'"),
        "tag": ("'v1:x,y'", "bad tag 'v1:x,y'"),
        "name": ("'a,b'", "bad name 'a,b'"),
        "version": ("'-1'", "bad version '-1'"),
        "system": ("NULL", "bad system None (not text)"),
        "uarch": ("'gh 200'", "bad uarch 'gh 200'"),
        "size": ("'big'", "bad size 'big' (not a whole number)"),
        "date": ("'2024\x1b[2J'", r"bad date '2024\x1b[2J'"),
        "sha256": (f"'{SHA.upper()}'", f"bad sha256 '{SHA.upper()[:40]}'... (64 long)"),
    }
    replace_records(repo, " UNION ALL ".join(
        [RECORDS, *(row(**{column: value}) for column, (value, _) in bad.items())]))
    read = repository.read(repo)
    assert [r.label for r in read.records] == ["prgenv-gnu/24.11:v1@daint%gh200"]
    index = repo / "index.db"
    assert read.problems == [
        f"{index}: row {number}{'' if column == 'sha256' else f' (sha256 {SHA})'}: "
        f"not served, {text}" for number, (column, (_, text)) in enumerate(bad.items(), 2)]
    assert read.readable


def test_problems_are_listed_up_to_a_bound(repo: Path) -> None:
    count = repository.MAX_PROBLEMS + 30
    replace_records(repo, f"WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r "
                          f"WHERE n < {count}) " + row(tag="'a:' || n") + " FROM r")
    read = repository.read(repo)
    assert len(read.problems) == repository.MAX_PROBLEMS + 1
    assert read.problems[-1] == f"{repo / 'index.db'}: and 30 more problems"


def test_rows_are_bounded(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_RECORDS rows the index is not read, whatever the rows hold: a random part of
    it would be no index."""
    index = repo / "index.db"
    replace_records(repo, ENDLESS)
    started = time.monotonic()
    endless = repository.read(repo)
    assert (endless.records, endless.readable, endless.problems) == (
        [], False, [f"{index}: more than {repository.MAX_RECORDS} records: not read"])
    assert time.monotonic() - started < 2
    monkeypatch.setattr(repository, "MAX_RECORDS", 1000)
    many = ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < {}) "
            + row(name="'many' || n") + " FROM r")
    replace_records(repo, many.format(1000))
    assert len(repository.read(repo).records) == 1000
    replace_records(repo, many.format(1001))
    assert repository.read(repo).problems == [f"{index}: more than 1000 records: not read"]
    # Rows are counted as they are read too (a view may give more rows the second time).
    monkeypatch.setattr(repository, "_count", lambda connection: 0)
    assert repository.read(repo).problems == [f"{index}: more than 1000 records: not read"]
    replace_records(repo, ENDLESS)
    assert repository.read(repo).problems == [f"{index}: more than 1000 records: not read"]


def test_time_is_bounded(repo: Path) -> None:
    replace_records(repo, SILENT)
    started = time.monotonic()
    read = repository.read(repo, timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 1.5
    assert (read.records, read.problems) == ([], [
        f"{repo / 'index.db'}: no answer within 1 s (a records view that does not end?): "
        "not read"])


def test_memory_is_bounded(repo: Path) -> None:
    replace_records(repo, GROWING)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    read = repository.read(repo, timeout=60.0)
    assert read.problems == [f"{repo / 'index.db'}: reading it takes more than "
                             f"{repository.HEAP_LIMIT >> 20} MiB: not read"]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 2 * repository.HEAP_LIMIT >> 10
    replace_records(repo, row(date="zeroblob(100000)"))
    assert repository.read(repo).problems == [
        f"{repo / 'index.db'}: string or blob too big (more than {repository.MAX_VALUE} "
        "bytes): not read"]
    replace_records(repo, RECORDS)
    assert [r.id for r in repository.read(repo).records] == [ID]  # SQLite serves on


async def test_a_catalog_answers_before_it_gives_up(repo: Path) -> None:
    """The catalog gives up on its sources after `source_timeout`; the repositories' share
    of it comes first: their problem is reported and their last read kept."""
    catalog = Catalog(repos=[repo], source_timeout=1.0)
    catalog.refresh()
    assert catalog.listing() == {ID: repo / "images" / SHA / "store.squashfs"}
    replace_records(repo, SILENT)
    started = trio.current_time()
    assert await catalog.reread() is False  # answered: nothing changed
    assert trio.current_time() - started < 1.0
    assert catalog.listing() == {ID: repo / "images" / SHA / "store.squashfs"}


def test_an_abandoned_read_stops_by_itself(repo: Path) -> None:
    """A read that nobody waits for any more (the catalog gave up on its thread) ends at its
    time bound, whatever its view does."""
    for view in (SILENT, GROWING):
        replace_records(repo, view)
        reader = threading.Thread(target=repository.read, args=(repo,),
                                  kwargs={"timeout": 1.0}, daemon=True)
        reader.start()
        reader.join(2.0)
        assert not reader.is_alive(), view
