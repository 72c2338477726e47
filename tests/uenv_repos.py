"""uenv repositories for tests, with the schema that uenv creates (`uenv repo create`).

`make_repository(root, images)` writes `index.db` and `images/<sha256>/store.squashfs` (+ meta/)
for each image given; `pull(root, image)` adds it or moves its tags as `uenv image pull` would;
`replace_records(root, select)` makes the index hostile, as anyone who can write it can.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
PRAGMA foreign_keys=on;
CREATE TABLE images (
    sha256 TEXT PRIMARY KEY CHECK(length(sha256)==64),
    id TEXT UNIQUE CHECK(length(id)==16),
    date TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE uenv (
    version_id INTEGER PRIMARY KEY,
    system TEXT NOT NULL,
    uarch TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    UNIQUE (system, uarch, name, version)
);
CREATE TABLE tags (
    version_id INTEGER,
    tag TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (version_id, tag),
    FOREIGN KEY (version_id) REFERENCES uenv (version_id) ON DELETE CASCADE ON UPDATE CASCADE,
    FOREIGN KEY (sha256) REFERENCES images (sha256) ON DELETE CASCADE ON UPDATE CASCADE
);
CREATE VIEW records AS
SELECT uenv.system AS system, uenv.uarch AS uarch, uenv.name AS name,
       uenv.version AS version, tags.tag AS tag, images.date AS date, images.size AS size,
       tags.sha256 AS sha256, images.id AS id
FROM tags
    INNER JOIN uenv ON uenv.version_id = tags.version_id
    INNER JOIN images ON images.sha256 = tags.sha256;
"""
# The rows of uenv's own `records` view, for a hostile view to add its own to.
RECORDS = SCHEMA.split("CREATE VIEW records AS")[1].strip().rstrip(";")


@dataclass(frozen=True)
class Pulled:
    """An image pulled into a repository, with its tags (label without the tag part)."""

    content: bytes  # the store.squashfs bytes (its sha256 is the image's)
    date: str
    system: str
    uarch: str
    name: str
    version: str
    tags: tuple[str, ...]
    meta: Mapping[str, str] | None = None  # files of meta/, e.g. {"env.json": "..."}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


def make_repository(root: Path, images: Iterable[Pulled]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(root / "index.db") as db:
        db.executescript(SCHEMA)
    for image in images:
        pull(root, image)
    return root


def pull(root: Path, image: Pulled) -> None:
    """Put *image* in the repository and point its tags at it (moving them if they exist)."""
    directory = root / "images" / image.sha256
    (directory / "meta").mkdir(parents=True, exist_ok=True)
    (directory / "store.squashfs").write_bytes(image.content)
    for name, text in (image.meta or {}).items():
        (directory / "meta" / name).write_text(text)
    db = sqlite3.connect(root / "index.db")
    try:
        with db:
            db.execute("PRAGMA foreign_keys=on")
            db.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)",
                       (image.sha256, image.sha256[:16], image.date, len(image.content)))
            db.execute("INSERT OR IGNORE INTO uenv (system, uarch, name, version) "
                       "VALUES (?, ?, ?, ?)", (image.system, image.uarch, image.name,
                                               image.version))
            (version_id,) = db.execute(
                "SELECT version_id FROM uenv WHERE system=? AND uarch=? AND name=? AND "
                "version=?", (image.system, image.uarch, image.name, image.version)).fetchone()
            for tag in image.tags:
                db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)",
                           (version_id, tag, image.sha256))
    finally:
        db.close()


def replace_records(root: Path, select: str) -> None:
    """Make *root*'s view `records` `CREATE VIEW records AS <select>` (e.g. `RECORDS UNION
    ALL <rows of one's own>`, or rows that never end)."""
    db = sqlite3.connect(root / "index.db")
    try:
        with db:
            db.execute("DROP VIEW records")
            db.execute(f"CREATE VIEW records AS {select}")
    finally:
        db.close()
