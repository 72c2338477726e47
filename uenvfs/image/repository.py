"""uenv repositories: the index of a directory that `uenv repo create` made.

A repository is what `uenv repo create` makes and `uenv image pull` fills: a directory with
an SQLite index `index.db` and one directory per image, `images/<sha256>/store.squashfs`
with `images/<sha256>/meta/` (env.json and the rest) beside it. The index's view `records`
has one row per tag: (system, uarch, name, version, tag, date, size, sha256, id); several
tags may name one image (one sha256), and a tag may move to a new image.

Labels and how they resolve are in core/labels.py.

The index is opened read-only (it may sit on a shared filesystem while another node pulls
into it); a locked, missing or foreign database is a problem to report, never a crash.
Whoever can write the repository wrote the index, and the daemon reads it as root: a row
is served only if `labels.record_fault` finds nothing wrong with it (else it is reported by
its row number), and a read is bounded in rows (MAX_RECORDS), in SQLite's memory (HEAP_LIMIT,
MAX_VALUE) and in time (its *timeout*, checked by SQLite as it runs), so that a `records`
view that never ends stops by itself, even in a thread that nobody waits for any more. An
index past a bound is not read at all (its records would be a random part of it).
Pure but for `read` (sqlite3 and a few stats): no trio, no pyfuse3.
"""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.labels import SHA256, Record, record_fault, shown

if TYPE_CHECKING:
    import sqlite3

INDEX = "index.db"
COLUMNS = ("system", "uarch", "name", "version", "tag", "date", "size", "sha256", "id")
LOCK_TIMEOUT = 2.0  # seconds to wait for a writer's lock before the index counts as locked
READ_TIMEOUT = 30.0  # seconds a read may take by default (the daemon gives its mount_timeout)
MAX_RECORDS = 100_000  # rows of `records` read, at most: an index with more is not read
MAX_PROBLEMS = 20  # problems listed per read; the others are counted
MAX_VALUE = 1 << 16  # bytes of one SQLite text or blob (SQLITE_LIMIT_LENGTH)
# Bytes of memory SQLite may use in this process (PRAGMA hard_heap_limit; temporary tables
# in memory count too): a view that grows without end fails at this, not at the OOM killer.
HEAP_LIMIT = 32 << 20
PROGRESS_STEPS = 1000  # SQLite instructions between two looks at the clock


@dataclass
class Repository:
    """A repository's records (of this node's system and uarch) and what was wrong with it.

    Invariant: `problems` holds at most MAX_PROBLEMS lines about rows, then why the index
    could not be read (if so) and how many problems were not listed (if any); `records` is
    empty when `readable` is False."""

    path: Path
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    readable: bool = True  # False: the index itself could not be read (records empty)
    untold: int = 0  # problems past MAX_PROBLEMS, not listed

    def image_file(self, sha256: str) -> Path:
        return self.path / "images" / sha256 / "store.squashfs"

    def problem(self, text: str) -> None:
        """Report *text*, unless MAX_PROBLEMS are listed already (then it is counted)."""
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.untold += 1

    def unreadable(self, text: str) -> Repository:
        """The index as a whole cannot be used, for the reason *text*: no record of it."""
        self.records.clear()
        self.readable = False
        self.problems.append(text)
        return self


class _TooMany(Exception):
    """The index has more than MAX_RECORDS rows."""


def _open(index: Path, timeout: float) -> sqlite3.Connection:
    """*index*, read-only, with SQLite's bounds set: values of MAX_VALUE bytes, HEAP_LIMIT
    bytes of memory (temporary tables in memory, not in files), and an end after *timeout*
    seconds (SQLite then fails with "interrupted")."""
    import sqlite3  # here: a daemon without repositories need not load it

    uri = f"file:{urllib.parse.quote(str(index))}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT)
    try:
        connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE)
        connection.execute(f"PRAGMA hard_heap_limit = {HEAP_LIMIT}")
        connection.execute("PRAGMA temp_store = MEMORY")
        deadline = time.monotonic() + timeout
        connection.set_progress_handler(lambda: time.monotonic() > deadline, PROGRESS_STEPS)
    except BaseException:
        connection.close()
        raise
    return connection


def read(path: Path, system: str | None = None, uarch: str | None = None,
         timeout: float = READ_TIMEOUT) -> Repository:
    """The repository at *path*: its records of *system* and *uarch* (None: any) whose
    image file is there, read within *timeout* seconds. Never raises: what is wrong goes to
    `problems`, and the records that can be read are kept."""
    import sqlite3

    repo = Repository(path)
    index = path / INDEX
    if not index.is_file():
        return repo.unreadable(f"{path}: no {INDEX} (not a uenv repository)")
    try:
        connection = _open(index, timeout)
    except sqlite3.Error as exc:
        return repo.unreadable(f"{index}: cannot open: {exc}")
    try:
        _read_rows(repo, connection, system, uarch)
    except _TooMany:
        repo.unreadable(f"{index}: more than {MAX_RECORDS} records: not read")
    except sqlite3.DataError as exc:  # a text or blob past MAX_VALUE
        repo.unreadable(f"{index}: {exc} (more than {MAX_VALUE} bytes): not read")
    except MemoryError:
        repo.unreadable(f"{index}: reading it takes more than {HEAP_LIMIT >> 20} MiB: not read")
    except sqlite3.OperationalError as exc:
        text = str(exc)
        repo.unreadable(f"{index}: " + (
            "locked by a writer" if "locked" in text else
            f"no answer within {timeout:g} s (a records view that does not end?): not read"
            if "interrupted" in text else
            "unknown schema (no records view with the columns of uenv's)"
            if "no such" in text else text))
    except sqlite3.DatabaseError as exc:
        repo.unreadable(f"{index}: not a readable SQLite database: {exc}")
    finally:
        connection.close()
    if repo.untold:
        repo.problems.append(f"{index}: and {repo.untold} more problems")
    return repo


def _read_rows(repo: Repository, connection: sqlite3.Connection, system: str | None,
               uarch: str | None) -> None:
    """Take the rows of `records` into *repo*, one at a time. Raises _TooMany past
    MAX_RECORDS rows, and what SQLite raises."""
    index = repo.path / INDEX
    if _count(connection) > MAX_RECORDS:
        raise _TooMany
    present: dict[str, bool] = {}  # sha256 -> whether its image file is there
    rows = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM records")
    for number, row in enumerate(rows, 1):
        if number > MAX_RECORDS:
            raise _TooMany
        record = _record(row)
        if isinstance(record, str):
            sha256 = row[COLUMNS.index("sha256")]
            named = (f"row {number} (sha256 {sha256})" if isinstance(sha256, str)
                     and SHA256.fullmatch(sha256) else f"row {number}")
            repo.problem(f"{index}: {named}: not served, bad {record}")
            continue
        if (system and record.system != system) or (uarch and record.uarch != uarch):
            continue
        if record.sha256 not in present:
            present[record.sha256] = repo.image_file(record.sha256).is_file()
            if not present[record.sha256]:
                repo.problem(f"{repo.path}: {record.label}: no image file "
                             f"{repo.image_file(record.sha256)}")
        if present[record.sha256]:
            repo.records.append(record)


def _count(connection: sqlite3.Connection) -> int:
    """The rows of `records`, up to MAX_RECORDS + 1, counted by SQLite alone: rows that
    never end are refused in a few milliseconds, not after MAX_RECORDS records made in
    Python. (`_read_rows` counts them again: a view may give other rows each time.)"""
    (count,) = connection.execute(
        f"SELECT count(*) FROM (SELECT 1 FROM records LIMIT {MAX_RECORDS + 1})").fetchone()
    return int(count)


def _record(row: tuple[object, ...]) -> Record | str:
    """The record of a row of `records`, or what is wrong with it (`field 'value'`)."""
    system, uarch, name, version, tag, date, size, sha256, id_ = row
    if (type(system) is str and type(uarch) is str and type(name) is str
            and type(version) is str and type(tag) is str and type(date) is str
            and type(size) is int and type(sha256) is str and type(id_) is str):
        record = Record(system, uarch, name, version, tag, date, size, sha256, id_)
        fault = record_fault(record)
        return record if fault is None else fault
    column, value = next((column, value) for column, value in zip(COLUMNS, row, strict=True)
                         if type(value) is not (int if column == "size" else str))
    return f"{column} {shown(value)} (not {'a whole number' if column == 'size' else 'text'})"
