"""uenv repositories read from real SQLite indexes with uenv's schema, and labels resolved
against them: systems filtered, tags shared and moved, a missing image file, a foreign or
locked database, a database written to while it is read."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from uenvfs.core.labels import Ambiguous, Label, LabelError, parse_label, resolve, table
from uenvfs.image import repository

from ..uenv_repos import Pulled, make_repository, pull

OLD = Pulled(b"gnu 24.7", "2024-07-01 10:00:00", "daint", "gh200", "prgenv-gnu", "24.7",
             ("v1",))
NEW = Pulled(b"gnu 24.11 v1", "2024-11-20 10:00:00", "daint", "gh200", "prgenv-gnu", "24.11",
             ("v1", "latest"))
EIGER = Pulled(b"gnu eiger", "2024-11-21 10:00:00", "eiger", "zen2", "prgenv-gnu", "24.11",
               ("v1",))
TOOL = Pulled(b"tool", "2024-10-01 10:00:00", "daint", "gh200", "tool", "1.0", ("v2",))


def test_labels() -> None:
    assert parse_label("prgenv-gnu") == Label("prgenv-gnu")
    assert parse_label("prgenv-gnu/24.11:v1@daint%gh200") == Label(
        "prgenv-gnu", "24.11", "v1", "daint", "gh200")
    assert parse_label("cp2k%zen2@eiger") == Label("cp2k", system="eiger", uarch="zen2")
    assert str(parse_label("a:v1%x")) == "a:v1%x"
    for bad in ("", "/24.11", "a b", "a:v1/2", "a/1/2", "a@x@y", "a/1:", "a,b", "a:/x", "../etc",
                "-x/1"):
        with pytest.raises(LabelError):
            parse_label(bad)


def test_labels_as_uenv_parses_them() -> None:
    """The forms of uenv's own tests (test/unit/parse.cpp): a name starting with `_`, and
    `@*` (any system) after a full or a bare label; never `%*` or `*` elsewhere."""
    assert parse_label("_") == Label("_")
    assert parse_label("_private/1.0:v1") == Label("_private", "1.0", "v1")
    assert parse_label("prgenv-gnu/24.7:v1@*") == Label("prgenv-gnu", "24.7", "v1")
    assert parse_label("prgenv-gnu@*%a100") == Label("prgenv-gnu", uarch="a100")
    for bad in ("prgenv-gnu%*", "*", "prgenv-gnu/*", "prgenv-gnu@**", ".wombat",
                "prgenv-gnu/24:v1@", "prgenv-gnu/24:v1@gh200%"):
        with pytest.raises(LabelError):
            parse_label(bad)


def test_read_filters_by_system_and_keeps_every_tag(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo", [OLD, NEW, EIGER, TOOL])
    repo = repository.read(root, "daint", "gh200")
    assert repo.problems == []
    assert sorted(r.label for r in repo.records) == [
        "prgenv-gnu/24.11:latest@daint%gh200", "prgenv-gnu/24.11:v1@daint%gh200",
        "prgenv-gnu/24.7:v1@daint%gh200", "tool/1.0:v2@daint%gh200"]
    record = next(r for r in repo.records if r.tag == "latest")
    assert (record.sha256, record.id, record.size) == (NEW.sha256, NEW.sha256[:16],
                                                       len(NEW.content))
    assert repo.image_file(record.sha256).read_bytes() == NEW.content
    assert len(repository.read(root).records) == 5  # no filter: every system


def test_resolution(tmp_path: Path) -> None:
    records = repository.read(make_repository(tmp_path / "repo", [OLD, NEW, EIGER, TOOL]),
                              "daint", "gh200").records
    # Two tags of one image: one image, whichever way it is named.
    for text in ("prgenv-gnu/24.11", "prgenv-gnu/24.11:latest", "prgenv-gnu/24.11:v1@daint",
                 NEW.sha256, NEW.sha256[:16]):
        assert {r.sha256 for r in resolve(records, text)} == {NEW.sha256}, text
    assert [r.tag for r in resolve(records, "tool")] == ["v2"]
    with pytest.raises(LabelError) as ambiguous:
        resolve(records, "prgenv-gnu")
    assert str(ambiguous.value) == (
        "prgenv-gnu is ambiguous: it matches 2 images: prgenv-gnu/24.11:v1@daint%gh200 "
        f"prgenv-gnu/24.11:latest@daint%gh200 ({NEW.sha256[:16]}); "
        f"prgenv-gnu/24.7:v1@daint%gh200 ({OLD.sha256[:16]})")
    # As uenv's query: `@*` is any system; an id or sha256 with a system or uarch names its
    # image if one of its records has them.
    assert {r.sha256 for r in resolve(records, "prgenv-gnu/24.7:v1@*")} == {OLD.sha256}
    assert {r.tag for r in resolve(records, "tool@*")} == {"v2"}
    for text in (f"{NEW.sha256[:16]}@daint", f"{NEW.sha256}%gh200@daint"):
        assert {r.sha256 for r in resolve(records, text)} == {NEW.sha256}, text
    with pytest.raises(LabelError, match="no uenv matches"):
        resolve(records, f"{NEW.sha256[:16]}@eiger")
    with pytest.raises(Ambiguous) as candidates:
        resolve(records, "prgenv-gnu@*")
    assert {r.sha256 for r in candidates.value.records} == {NEW.sha256, OLD.sha256}
    assert table(candidates.value.records) == [
        "uenv                     arch   system  id                size(MB)  date",
        f"prgenv-gnu/24.11:latest  gh200  daint   {NEW.sha256[:16]}  0         2024-11-20",
        f"prgenv-gnu/24.11:v1      gh200  daint   {NEW.sha256[:16]}  0         2024-11-20",
        f"prgenv-gnu/24.7:v1       gh200  daint   {OLD.sha256[:16]}  0         2024-07-01"]
    for text, message in (("prgenv-gnu/25.1", "no uenv matches prgenv-gnu/25.1"),
                          ("prgenv-gnu@eiger", "no uenv matches"),  # filtered out
                          ("0" * 64, "no image with sha256 or id"),
                          ("a,b", "is not a uenv label")):
        with pytest.raises(LabelError, match=message):
            resolve(records, text)


def test_a_moved_tag_names_the_new_image(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo", [NEW])
    v2 = Pulled(b"gnu 24.11 v2", "2024-12-01 10:00:00", "daint", "gh200", "prgenv-gnu",
                "24.11", ("v2", "latest"))
    pull(root, v2)
    records = repository.read(root, "daint", "gh200").records
    assert [r.sha256 for r in resolve(records, "prgenv-gnu/24.11:latest")] == [v2.sha256]
    assert [r.tag for r in resolve(records, NEW.sha256[:16])] == ["v1"]  # still there
    with pytest.raises(LabelError, match="ambiguous"):
        resolve(records, "prgenv-gnu/24.11")


def test_problems_are_reported_and_the_rest_served(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo", [NEW, TOOL])
    repository.read(root)  # fine
    (root / "images" / TOOL.sha256 / "store.squashfs").unlink()
    repo = repository.read(root)
    assert [r.name for r in repo.records] == ["prgenv-gnu", "prgenv-gnu"]
    assert repo.problems == [f"{root}: tool/1.0:v2@daint%gh200: no image file "
                             f"{root / 'images' / TOOL.sha256 / 'store.squashfs'}"]
    assert repository.read(tmp_path / "none").problems == [
        f"{tmp_path / 'none'}: no index.db (not a uenv repository)"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / "index.db") as db:
        db.execute("CREATE TABLE records (name TEXT)")
    assert repository.read(foreign).problems == [
        f"{foreign / 'index.db'}: unknown schema (no records view with the columns of uenv's)"]
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "index.db").write_bytes(b"not a database" * 100)
    assert "not a readable SQLite database" in repository.read(garbage).problems[0]


def test_a_database_being_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_repository(tmp_path / "repo", [NEW])
    writer = sqlite3.connect(root / "index.db", isolation_level=None)
    try:
        # A pull under way (not committed): readers see the index as it was.
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM tags")
        assert len(repository.read(root).records) == 2
        # While a writer holds the database exclusively, the index counts as locked.
        writer.execute("ROLLBACK")
        writer.execute("BEGIN EXCLUSIVE")
        monkeypatch.setattr(repository, "LOCK_TIMEOUT", 0.05)
        locked = repository.read(root)
        assert (locked.records, locked.problems) == ([], [
            f"{root / 'index.db'}: locked by a writer"])
        writer.execute("DELETE FROM tags WHERE tag = 'latest'")
        writer.execute("COMMIT")
    finally:
        writer.close()
    assert [r.tag for r in repository.read(root).records] == ["v1"]
