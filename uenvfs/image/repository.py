"""uenv repositories: the index of a directory that `uenv repo create` made.

A repository is what `uenv repo create` makes and `uenv image pull` fills: a directory with
an SQLite index `index.db` and one directory per image, `images/<sha256>/store.squashfs`
with `images/<sha256>/meta/` (env.json and the rest) beside it. The index's view `records`
has one row per tag: (system, uarch, name, version, tag, date, size, sha256, id); several
tags may name one image (one sha256), and a tag may move to a new image.

Labels and how they resolve are in core/labels.py.

The index is opened read-only (it may sit on a shared filesystem while another node pulls
into it); a locked, missing or foreign database is a problem to report, never a crash.
Pure but for `read` (sqlite3 and a few stats): no trio, no pyfuse3.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.labels import SHA256, Record

if TYPE_CHECKING:
    import sqlite3

INDEX = "index.db"
COLUMNS = ("system", "uarch", "name", "version", "tag", "date", "size", "sha256", "id")
LOCK_TIMEOUT = 2.0  # seconds to wait for a writer's lock before the index counts as locked


@dataclass
class Repository:
    """A repository's records (of this node's system and uarch) and what was wrong with it."""

    path: Path
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    readable: bool = True  # False: the index itself could not be read (records empty)

    def image_file(self, sha256: str) -> Path:
        return self.path / "images" / sha256 / "store.squashfs"


def _open(index: Path) -> sqlite3.Connection:
    import sqlite3  # here: a daemon without repositories need not load it

    uri = f"file:{urllib.parse.quote(str(index))}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT)


def read(path: Path, system: str | None = None, uarch: str | None = None) -> Repository:
    """The repository at *path*: its records of *system* and *uarch* (None: any) whose
    image file is there. Never raises: what is wrong goes to `problems`, and the records
    that can be read are kept."""
    import sqlite3

    repo = Repository(path)
    index = path / INDEX
    if not index.is_file():
        repo.problems.append(f"{path}: no {INDEX} (not a uenv repository)")
        repo.readable = False
        return repo
    try:
        connection = _open(index)
    except sqlite3.Error as exc:
        repo.problems.append(f"{index}: cannot open: {exc}")
        repo.readable = False
        return repo
    try:
        rows = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM records").fetchall()
    except sqlite3.OperationalError as exc:
        text = str(exc)
        reason = ("locked by a writer" if "locked" in text else
                  "unknown schema (no records view with the columns of uenv's)"
                  if "no such" in text else text)
        repo.problems.append(f"{index}: {reason}")
        repo.readable = False
        return repo
    except sqlite3.DatabaseError as exc:
        repo.problems.append(f"{index}: not a readable SQLite database: {exc}")
        repo.readable = False
        return repo
    finally:
        connection.close()
    missing = set()
    for row in rows:
        try:
            system_, uarch_, name, version, tag, date, size, sha256, id_ = row
            record = Record(str(system_), str(uarch_), str(name), str(version), str(tag),
                            str(date), int(size), str(sha256), str(id_))
        except (TypeError, ValueError):
            repo.problems.append(f"{index}: a record with a bad field: {row!r}")
            continue
        if not SHA256.fullmatch(record.sha256):
            repo.problems.append(f"{index}: {record.label}: bad sha256 {record.sha256!r}")
            continue
        if (system and record.system != system) or (uarch and record.uarch != uarch):
            continue
        if not repo.image_file(record.sha256).is_file():
            if record.sha256 not in missing:
                missing.add(record.sha256)
                repo.problems.append(f"{path}: {record.label}: no image file "
                                     f"{repo.image_file(record.sha256)}")
            continue
        repo.records.append(record)
    return repo
