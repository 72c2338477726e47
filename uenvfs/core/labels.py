"""uenv labels: the names of a repository's images, and how a label picks one image.

A label names records: `name/version:tag@system%uarch`, every part but the name optional
(`prgenv-gnu`, `prgenv-gnu/24.11`, `prgenv-gnu:v1@daint`), in uenv's grammar (parse.cpp):
a name may start with a letter, a digit or `_`, and `@*` is "any system" (as no system is
here: the daemon serves the records of its node's system only, where one is configured). A
64-digit sha256 or the 16-digit id names one image; with `@system` or `%uarch` and nothing
else (`<id>@daint`), it names that image if one of its records is of that system and uarch,
as uenv's query does. The rule, as uenv's: a label resolves when every record it matches is
one image (one sha256); when they are several, it is ambiguous and the error (`Ambiguous`)
lists them. Nothing is chosen by date.

A record comes from a repository's index, which anyone who can write the repository wrote:
`record_fault` says whether it is as uenv makes it (its id and sha256 hexadecimal, each part
of its label in uenv's characters), for only such records to be served.

Pure: the daemon's `.control`, the catalog and the command line share these rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_WORD = r"[A-Za-z0-9_.-]+"  # as uenv allows in each part
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"  # no leading '.' or '-': never '..' or an option
_PART = re.compile(rf"([/:@%])({_WORD}|(?<=@)\*)")  # `@*`: any system
ANY_SYSTEM = "*"
SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{16}")
# Each part of a record's label, as uenv parses one (parse_name: a letter, digit or '_', then
# those, '.' and '-'), at most MAX_PART characters; a record's date, printable ASCII.
MAX_PART = 128
_RECORD_PART = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_PART - 1}}}")
_RECORD_DATE = re.compile(r"[ -~]{0,64}")
_CHECKS = (("id", _ID), ("sha256", SHA256), ("name", _RECORD_PART), ("version", _RECORD_PART),
           ("tag", _RECORD_PART), ("system", _RECORD_PART), ("uarch", _RECORD_PART),
           ("date", _RECORD_DATE))
_RECORD = re.compile("\0".join(rule.pattern for _, rule in _CHECKS))  # every field at once


class LabelError(Exception):
    """A label that is not well formed, matches nothing or several images; says which."""


class NoMatch(LabelError):
    """A well-formed label (or sha256, or id) that no record matches."""


class Ambiguous(LabelError):
    """A label that matches several images: *records*, every record it matches."""

    def __init__(self, message: str, records: Sequence[Record]) -> None:
        super().__init__(message)
        self.records = tuple(records)


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
    """`name[/version][:tag][@system][%uarch]` (system and uarch in either order; `@*` is
    any system, as none)."""
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
    if parts.get("system") == ANY_SYSTEM:
        del parts["system"]
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


def record_fault(record: Record) -> str | None:
    """What keeps *record* from being served: its first field that is not as uenv writes it
    (`field 'value'`, the value cut short); None if there is none. Its id and label become
    names in the mount root and its sha256 a path: no '/', ':', ',' or blank may get there."""
    if record.size >= 0 and _RECORD.fullmatch("\0".join(
            (record.id, record.sha256, record.name, record.version, record.tag,
             record.system, record.uarch, record.date))):
        return None  # the common case, in one match
    for field_name, rule in _CHECKS:
        value = getattr(record, field_name)
        if rule.fullmatch(value) is None:
            return f"{field_name} {shown(value)}"
    if record.size < 0:
        return f"size {record.size}"
    return None


def shown(value: object, limit: int = 40) -> str:
    """*value* for a log line: its repr, a long text or blob cut short after *limit*."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} long)"
    return repr(value)


def resolve(records: Sequence[Record], text: str) -> list[Record]:
    """The records of the one image that *text* names (a label, a sha256 or an id), every
    tag of it that matches. Raises LabelError saying why there is none or which images a
    label could mean."""
    if SHA256.fullmatch(text) or _ID.fullmatch(text):
        found = [r for r in records if text in (r.sha256, r.id)]
        if not found:
            raise NoMatch(f"no image with sha256 or id {text}")
        return found
    label = parse_label(text)
    by_id = (label.version is None and label.tag is None
             and (SHA256.fullmatch(label.name) or _ID.fullmatch(label.name)) is not None)
    found = [r for r in records if r.matches(label) or (
        by_id and label.name in (r.sha256, r.id) and r.matches(Label(
            r.name, system=label.system, uarch=label.uarch)))]
    if not found:
        raise NoMatch(f"no uenv matches {text}")
    images = {r.sha256 for r in found}
    if len(images) > 1:
        raise Ambiguous(f"{text} is ambiguous: it matches {len(images)} images: "
                        + "; ".join(_candidates(found)), found)
    return found


def labels_by_id(records: Iterable[Record]) -> dict[str, list[str]]:
    """The labels of each image, by its id (the name it is served by), sorted."""
    labels: dict[str, list[str]] = {}
    for record in records:
        labels.setdefault(record.id, []).append(record.label)
    return {name: sorted(found) for name, found in labels.items()}


def _candidates(records: Iterable[Record]) -> list[str]:
    by_image: dict[str, list[str]] = {}
    for record in sorted(records, key=lambda r: (r.date, r.label), reverse=True):
        by_image.setdefault(record.sha256, []).append(record.label)
    return [f"{' '.join(labels)} ({sha[:16]})" for sha, labels in by_image.items()]


def table(records: Iterable[Record]) -> list[str]:
    """*records* as `uenv image ls` lists them (and as uenv lists the candidates of an
    ambiguous label): a header, then one line per record, sorted as uenv sorts them."""
    rows = [(f"{r.name}/{r.version}:{r.tag}", r.uarch, r.system, r.id,
             str(max(r.size, 0) // (1 << 20)), r.date[:10])
            for r in sorted(records, key=lambda r: (r.name, r.version, r.tag, r.system,
                                                    r.uarch, r.date, r.sha256))]
    header = ("uenv", "arch", "system", "id", "size(MB)", "date")
    widths = [max(len(row[i]) for row in [header, *rows]) + 2 for i in range(5)]
    return ["".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + row[5] for row in [header, *rows]]
