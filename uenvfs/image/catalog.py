"""Image sources, autofs-style: image directories, map files, uenv repositories and a
program map.

Each source turns a name into the path of a SquashFS image. The first source that knows a
name wins, in this order: image directories (in the order given), map files, repositories,
program map. A name that is not one plain path component, or that no source knows, does not
exist.

A uenv repository serves each image (sha256) once, under its 16-digit id, and each of its
labels as an alias of that name (a symlink in the mount root): `name+version+tag`, with
`+system` and `+uarch` added unless the node's system and uarch are configured (records of
other systems are then not served). So the tags of one image share one mount and one
refcount, and no served name holds a `:` or `,`.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from ..core import labels
from ..core.config import Config
from ..core.labels import LabelError, NoMatch, Record
from ..core.names import valid_name
from . import repository
from .program_map import ProgramMap

log = logging.getLogger(__name__)
T = TypeVar("T")

SUFFIXES = (".sqfs", ".squashfs")
# The repositories' indexes are read within this share of the source timeout (in all): one
# whose `records` view does not end is given up, reported and its last read kept, before the
# sources as a whole are given up on.
INDEX_SHARE = 0.9


@dataclass
class _Call:
    """A blocking call of a worker thread, which says when it is over."""

    done: bool = False


def name_of(filename: str) -> str | None:
    """The image name of a file in an image directory, or None if it is not an image file."""
    for suffix in SUFFIXES:
        if filename.endswith(suffix):
            name = filename[: -len(suffix)]
            return name if valid_name(name) else None
    return None


def parse_map(text: str, origin: str = "map") -> dict[str, Path]:
    """Parse a map file: `name  /path/to/image.sqfs` per line, `#` starts a comment."""
    entries: dict[str, Path] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if len(words) != 2 or not valid_name(words[0]) or not words[1].startswith("/"):
            log.warning("%s:%d: ignored, expected 'name /absolute/image.sqfs': %r",
                        origin, number, raw)
            continue
        entries.setdefault(words[0], Path(words[1]))
    return entries


def _is_image_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def alias_name(record: Record, system: str | None, uarch: str | None) -> str:
    """The served name of a repository record's label (see the module's docstring)."""
    parts = [record.name, record.version, record.tag]
    if not system:
        parts.append(record.system)
    if not uarch:
        parts.append(record.uarch)
    return "+".join(parts)


@dataclass(frozen=True)
class Sources:
    """What the listable sources hold: image name → file, alias → image name, and the
    repository records served (for labels)."""

    images: dict[str, Path] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    records: tuple[Record, ...] = ()


@dataclass
class Catalog:
    """name → image path, from every source. `refresh` re-reads the listable sources."""

    image_dirs: Sequence[Path] = ()
    map_files: Sequence[Path] = ()
    program_map: InitVar[Path | None] = None
    program_timeout: InitVar[float] = 10.0
    answer_ttl: InitVar[float] = 10.0
    _listing: dict[str, Path] = field(default_factory=dict)
    source_timeout: float = 30.0  # the longest wait for image directories and map files
    _hung: _Call | None = None  # the last call given up on (see `_off_loop`)
    repos: Sequence[Path] = ()
    system: str | None = None  # the node's: repository records of others are not served
    uarch: str | None = None
    _aliases: dict[str, str] = field(default_factory=dict)
    _records: tuple[Record, ...] = ()
    _last_read: dict[Path, repository.Repository] = field(default_factory=dict)
    program: ProgramMap = field(init=False)

    def __post_init__(self, program_map: Path | None, program_timeout: float,
                      answer_ttl: float) -> None:
        self.program = ProgramMap(program_map, program_timeout, answer_ttl)

    @classmethod
    def from_config(cls, config: Config) -> Catalog:
        """The sources and timeouts of *config*, not read yet (`refresh` reads them)."""
        catalog = cls()
        catalog.configure(config)
        return catalog

    def configure(self, config: Config) -> None:
        """Take the sources and timeouts of *config* (a reload); `reread` then reads them."""
        if (config.system, config.uarch) != (self.system, self.uarch):
            self._last_read.clear()  # records of another system: not a fallback any more
        self.image_dirs, self.map_files, self.repos = config.images, config.maps, config.repos
        self.system, self.uarch = config.system, config.uarch
        self.program.configure(config.program_map, config.program_timeout,
                               config.negative_cache)
        self.source_timeout = config.mount_timeout
        self._last_read = {root: read for root, read in self._last_read.items()
                           if root in self.repos}

    def refresh(self) -> bool:
        """Re-read the directories and map files (at start; see `reread` for the daemon).

        Returns whether the listing changed. Never raises: an unreadable source is logged
        and contributes nothing.
        """
        return self._apply(self._read_sources())

    async def reread(self) -> bool | None:
        """`refresh` from a worker thread (on reload and SIGHUP): sources on storage that
        hangs must not stop the daemon. None, and the listing kept, if they do not answer
        within `source_timeout`."""
        listing = await self._off_loop(self._read_sources)
        return None if listing is None else self._apply(listing)

    def _read_sources(self) -> Sources:
        """What the directories, map files and repositories list now (blocking; touches no
        state but the last good read of each repository, kept for when its index cannot be
        read)."""
        deadline = time.monotonic() + self.source_timeout * INDEX_SHARE
        listing: dict[str, Path] = {}
        for directory in self.image_dirs:
            for name, path in self._scan_dir(directory).items():
                listing.setdefault(name, path)
        for map_file in self.map_files:
            try:
                text = map_file.read_text(errors="replace")
            except OSError as exc:
                log.warning("map file %s unreadable: %s", map_file, exc)
                continue
            for name, path in parse_map(text, str(map_file)).items():
                listing.setdefault(name, path)
        aliases: dict[str, str] = {}
        records: list[Record] = []
        for root in self.repos:
            repo = repository.read(root, self.system, self.uarch,
                                   max(0.0, deadline - time.monotonic()))
            for problem in repo.problems:
                log.warning("uenv repository: %s", problem)
            if repo.readable:
                self._last_read[root] = repo
            elif root in self._last_read:  # locked by a pull, say: what it held a moment ago
                repo = self._last_read[root]
                log.warning("uenv repository %s: serving the %d records of its last read",
                            root, len(repo.records))
            for record in repo.records:
                path = repo.image_file(record.sha256)
                if listing.setdefault(record.id, path) != path:
                    continue  # the id is another source's name, or another repository's
                alias = alias_name(record, self.system, self.uarch)
                if valid_name(alias) and alias not in listing:
                    aliases.setdefault(alias, record.id)
                records.append(record)
        return Sources(listing, aliases, tuple(records))

    def _apply(self, sources: Sources) -> bool:
        self.program.forget()
        listing = sources.images
        changed = listing != self._listing or sources.aliases != self._aliases
        if changed:
            added = listing.keys() - self._listing.keys()
            removed = self._listing.keys() - listing.keys()
            log.info("image sources: %d images (%d added, %d removed), %d labels",
                     len(listing), len(added), len(removed), len(sources.aliases))
        self._listing = listing
        self._aliases = sources.aliases
        self._records = sources.records
        return changed

    def alias(self, name: str) -> str | None:
        """The image name that *name* stands for when it is a label link (listed), or a
        label, sha256 or id of a repository record that names one image; else None."""
        if name in self._listing:
            return None  # an image's own name (its id) is the image, not a link to it
        try:
            return self.label(name)
        except LabelError:
            return None

    def label(self, text: str) -> str | None:
        """The image name of the label link, label, sha256 or id *text*: None if nothing
        matches; LabelError if it is not a label or matches several images (the message
        lists them)."""
        target = self._aliases.get(text)
        if target is not None or not self._records:
            return target
        try:
            return labels.resolve(self._records, text)[0].id
        except NoMatch:
            return None

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def records(self) -> tuple[Record, ...]:
        """The repository records served (for labels)."""
        return self._records

    @staticmethod
    def _scan_dir(directory: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    name = name_of(entry.name)
                    if name is None or name in found:
                        continue
                    try:
                        if entry.is_file():  # follows a symlink to an image, as autofs would
                            found[name] = Path(entry.path)
                    except OSError:
                        continue
        except OSError as exc:
            log.warning("image directory %s unreadable: %s", directory, exc)
        return found

    def listing(self) -> dict[str, Path]:
        """The names that can be listed (the program map cannot be enumerated)."""
        return dict(self._listing)

    def lookup_listed(self, name: str) -> Path | None:
        """A name from the listable sources, picking up an image file added since the scan
        (blocking: for the start, before anything is served)."""
        if not valid_name(name):
            return None
        path = self._listing.get(name)
        if path is None:
            path = self._search_dirs(name)
            if path is not None:
                self._listing[name] = path
        return path

    def _search_dirs(self, name: str) -> Path | None:
        """The image file of *name* added to an image directory since the scan (blocking)."""
        for directory in self.image_dirs:
            for suffix in SUFFIXES:
                candidate = directory / (name + suffix)
                if _is_image_file(candidate):
                    return candidate
        return None

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T | None:
        """`fn(*args)` in a worker thread, given up after `source_timeout` (the storage of
        image directories and map files may hang: the loop must go on). While a call that
        was given up has not come back, the others are not even tried (None at once)."""
        if self._hung is not None and not self._hung.done:
            return None
        call = _Call()

        def run() -> T:
            try:
                return fn(*args)
            finally:
                call.done = True

        with trio.move_on_after(self.source_timeout):
            return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
        if not call.done:
            self._hung = call
            log.warning("image sources gave no answer in %.1f s (their storage may hang): "
                        "until they do, names not listed are not found and reload keeps "
                        "the listing", self.source_timeout)
        return None

    def remembers(self, name: str) -> bool:
        """Whether *name* is known without asking anything: listed, or a program map's answer."""
        return name in self._listing or self.program.remembers(name)

    @property
    def refused(self) -> int:
        """Program-map calls refused for want of a user's share of its time."""
        return self.program.refused

    async def _is_image(self, path: Path) -> bool:
        """Whether *path* is an image file, asked off the loop (its storage may hang)."""
        return bool(await self._off_loop(_is_image_file, path))

    async def resolve(self, name: str, uid: int = 0) -> Path | None:
        """The image path for *name*, or None if no source knows it.

        A name no listable source knows goes to the program map, which remembers its answers
        and shares its time out between users (*uid* asks; see image/program_map.py).
        """
        if not valid_name(name):
            return None
        path = self._listing.get(name)
        if path is None and self.image_dirs:
            path = await self._off_loop(self._search_dirs, name)
            if path is not None:
                self._listing[name] = path
        if path is not None or self.program.path is None:
            return path
        return await self.program.resolve(name, uid, self._is_image)

