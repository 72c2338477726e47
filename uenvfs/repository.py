"""uenv repositories, and the labels that name their images.

A repository is what `uenv repo create` makes and `uenv image pull` fills: a directory with
an SQLite index `index.db` and one directory per image, `images/<sha256>/store.squashfs`
with `images/<sha256>/meta/` (env.json and the rest) beside it. The index's view `records`
has one row per tag: (system, uarch, name, version, tag, date, size, sha256, id); several
tags may name one image (one sha256), and a tag may move to a new image.

A label names records: `name/version:tag@system%uarch`, every part but the name optional
(`prgenv-gnu`, `prgenv-gnu/24.11`, `prgenv-gnu:v1@daint`); a 64-digit sha256 or the
16-digit id names one image. The rule, as uenv's: a label resolves when every record it
matches is one image (one sha256); when they are several, it is ambiguous and the error
lists them. Nothing is chosen by date.

The index is opened read-only (it may sit on a shared filesystem while another node pulls
into it); a locked, missing or foreign database is a problem to report, never a crash.
Pure but for `read` (sqlite3 and a few stats): no trio, no pyfuse3.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite3

INDEX = "index.db"
COLUMNS = ("system", "uarch", "name", "version", "tag", "date", "size", "sha256", "id")
LOCK_TIMEOUT = 2.0  # seconds to wait for a writer's lock before the index counts as locked

_WORD = r"[A-Za-z0-9_.-]+"  # as uenv allows in each part
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # no leading '.' or '-': never '..' or an option
_PART = re.compile(rf"([/:@%])({_WORD})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{16}")


class LabelError(Exception):
    """A label that is not well formed, matches nothing or several images; says which."""


class NoMatch(LabelError):
    """A well-formed label (or sha256, or id) that no record matches."""


@dataclass(frozen=True)
class Label:
    """What a label asks for; None: any."""

    name: str
    version: str | None = None
    tag: str | None = None
    system: str | None = None
    uarch: str | None = None

    def __str__(self) -> str:
        return (self.name + (f"/{self.version}" if self.version else "")
                + (f":{self.tag}" if self.tag else "")
                + (f"@{self.system}" if self.system else "")
                + (f"%{self.uarch}" if self.uarch else ""))


_FIELDS = {"/": "version", ":": "tag", "@": "system", "%": "uarch"}
_STAGE = {"/": 1, ":": 2, "@": 3, "%": 3}


def parse_label(text: str) -> Label:
    """`name[/version][:tag][@system][%uarch]` (system and uarch in either order)."""
    match = re.match(_NAME, text)
    if match is None:
        raise LabelError(f"{text!r} is not a uenv label (name/version:tag@system%uarch)")
    parts: dict[str, str] = {}
    position, stage = match.end(), 0  # 1 after /version, 2 after :tag, 3 after @ or %
    while position < len(text):
        part = _PART.match(text, position)
        if part is None:
            raise LabelError(f"{text!r} is not a uenv label (name/version:tag@system%uarch)")
        sign, word = part.groups()
        key = _FIELDS[sign]
        if key in parts or (_STAGE[sign] <= stage and sign in "/:"):
            raise LabelError(f"{text!r}: {sign}{word} is out of place (name/version:tag"
                             "@system%uarch)")
        parts[key] = word
        stage = max(stage, _STAGE[sign])
        position = part.end()
    return Label(match.group(), **parts)


@dataclass(frozen=True)
class Record:
    """One row of `records`: a tag of an image."""

    system: str
    uarch: str
    name: str
    version: str
    tag: str
    date: str
    size: int
    sha256: str
    id: str

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}:{self.tag}@{self.system}%{self.uarch}"

    def matches(self, label: Label) -> bool:
        return all(wanted is None or wanted == have for wanted, have in (
            (label.name, self.name), (label.version, self.version), (label.tag, self.tag),
            (label.system, self.system), (label.uarch, self.uarch)))


@dataclass
class Repository:
    """A repository's records (of this node's system and uarch) and what was wrong with it."""

    path: Path
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    readable: bool = True  # False: the index itself could not be read (records empty)

    def image_file(self, sha256: str) -> Path:
        return self.path / "images" / sha256 / "store.squashfs"

    def meta_dir(self, sha256: str) -> Path:
        return self.path / "images" / sha256 / "meta"


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
        if not _SHA256.fullmatch(record.sha256):
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


def resolve(records: Sequence[Record], text: str) -> list[Record]:
    """The records of the one image that *text* names (a label, a sha256 or an id), every
    tag of it that matches. Raises LabelError saying why there is none or which images a
    label could mean."""
    if _SHA256.fullmatch(text) or _ID.fullmatch(text):
        found = [r for r in records if text in (r.sha256, r.id)]
        if not found:
            raise NoMatch(f"no image with sha256 or id {text}")
        return found
    label = parse_label(text)
    found = [r for r in records if r.matches(label)]
    if not found:
        raise NoMatch(f"no uenv matches {text}")
    images = {r.sha256 for r in found}
    if len(images) > 1:
        raise LabelError(f"{text} is ambiguous: it matches {len(images)} images: "
                         + "; ".join(_candidates(found)))
    return found


def _candidates(records: Iterable[Record]) -> list[str]:
    by_image: dict[str, list[str]] = {}
    for record in sorted(records, key=lambda r: (r.date, r.label), reverse=True):
        by_image.setdefault(record.sha256, []).append(record.label)
    return [f"{' '.join(labels)} ({sha[:16]})" for sha, labels in by_image.items()]
