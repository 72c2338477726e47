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
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from ..core import labels
from ..core.config import Config
from ..core.labels import LabelError, NoMatch, Record
from ..core.names import valid_name
from . import repository

log = logging.getLogger(__name__)
T = TypeVar("T")

SUFFIXES = (".sqfs", ".squashfs")
MAX_ANSWERS = 10_000  # program-map answers remembered; the "no"s are dropped beyond that
MAX_PROGRAM_OUTPUT = 4096 + 1  # one path (PATH_MAX bytes with its NUL) and a newline
# The kernel serializes lookups in the mount root, so while a program map runs no other new
# name can be looked up, by anyone. Each user but root may keep the program map busy for at
# most PROGRAM_SHARE of the time, after a burst of PROGRAM_BURST seconds; beyond that its
# unknown names are ENOENT without asking the program.
PROGRAM_SHARE = 0.1
PROGRAM_BURST = 2.0


@dataclass
class _Call:
    """A blocking call of a worker thread, which says when it is over."""

    done: bool = False


@dataclass
class ProgramBudget:
    """Seconds of program-map time one user may still spend (a token bucket).

    Invariant: 0 <= seconds <= PROGRAM_BURST after `refill`; spending may take it below 0
    (a call's cost is known only once it is over), which delays the next call accordingly.
    """

    seconds: float = PROGRAM_BURST
    at: float = 0.0

    def refill(self, now: float) -> None:
        self.seconds = min(PROGRAM_BURST, self.seconds + (now - self.at) * PROGRAM_SHARE)
        self.at = now


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
    program_map: Path | None = None
    program_timeout: float = 10.0
    answer_ttl: float = 10.0
    _listing: dict[str, Path] = field(default_factory=dict)
    _answers: dict[str, tuple[Path | None, float]] = field(default_factory=dict)
    _budgets: dict[int, ProgramBudget] = field(default_factory=dict)
    refused: int = 0  # program-map calls refused for want of budget
    source_timeout: float = 30.0  # the longest wait for image directories and map files
    _hung: _Call | None = None  # the last call given up on (see `_off_loop`)
    repos: Sequence[Path] = ()
    system: str | None = None  # the node's: repository records of others are not served
    uarch: str | None = None
    _aliases: dict[str, str] = field(default_factory=dict)
    _records: tuple[Record, ...] = ()
    _last_read: dict[Path, repository.Repository] = field(default_factory=dict)

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
        if (config.program_map, config.negative_cache) != (self.program_map, self.answer_ttl):
            self._answers.clear()
        self.image_dirs, self.map_files, self.repos = config.images, config.maps, config.repos
        self.system, self.uarch, self.program_map = config.system, config.uarch, config.program_map
        self.program_timeout, self.answer_ttl = config.program_timeout, config.negative_cache
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
            repo = repository.read(root, self.system, self.uarch)
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
        self._answers.clear()
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
        answer = self._answers.get(name)
        return name in self._listing or (answer is not None and answer[0] is not None)

    async def resolve(self, name: str, uid: int = 0) -> Path | None:
        """The image path for *name*, or None if no source knows it.

        A program map's answers are remembered (a "no" for `answer_ttl` seconds, a path until
        the next reload): the kernel of this libfuse serializes lookups in one directory, so
        while the program runs, no other new name in the root can be looked up. For the same
        reason a user other than root (*uid*) may keep it busy only so long (`ProgramBudget`).
        """
        if not valid_name(name):
            return None
        path = self._listing.get(name)
        if path is None and self.image_dirs:
            path = await self._off_loop(self._search_dirs, name)
            if path is not None:
                self._listing[name] = path
        if path is not None or self.program_map is None:
            return path
        known = self._answers.get(name)
        now = trio.current_time()
        if known is not None and (known[0] is not None or now < known[1]):
            return known[0]
        budget = None
        if uid != 0:
            budget = self._budgets.get(uid)
            if budget is None:
                budget = self._budgets[uid] = ProgramBudget(at=now)
            budget.refill(now)
            if budget.seconds <= 0:
                self.refused += 1
                log.debug("program map: uid %d is over its share; %r not asked", uid, name)
                return None
            if len(self._budgets) > MAX_ANSWERS:
                self._budgets = {u: b for u, b in self._budgets.items() if b.seconds < 0}
        path = await self._ask_program(name)
        done = trio.current_time()
        if budget is not None:
            budget.seconds -= done - now
        self._answers[name] = (path, done + self.answer_ttl)
        if len(self._answers) > MAX_ANSWERS:
            self._answers = {n: a for n, a in self._answers.items() if a[0] is not None}
        return path

    async def _ask_program(self, name: str) -> Path | None:
        assert self.program_map is not None
        try:
            with trio.fail_after(self.program_timeout):
                returncode, out = await _run_bounded([str(self.program_map), name],
                                                     MAX_PROGRAM_OUTPUT)
        except trio.TooSlowError:
            log.warning("program map %s %s: no answer after %.1f s",
                        self.program_map, name, self.program_timeout)
            return None
        except OSError as exc:
            log.warning("program map %s cannot run: %s", self.program_map, exc)
            return None
        if returncode is None:
            log.warning("program map %s %s: more than %d bytes of output; killed",
                        self.program_map, name, MAX_PROGRAM_OUTPUT)
            return None
        if returncode != 0:
            log.debug("program map %s %s: exit %d", self.program_map, name, returncode)
            return None
        lines = out.decode("utf-8", "replace").split()
        if len(lines) != 1 or not lines[0].startswith("/"):
            log.warning("program map %s %s: expected one absolute path, got %r",
                        self.program_map, name, out[:200])
            return None
        path = Path(lines[0])
        return path if await self._off_loop(_is_image_file, path) else None


async def _run_bounded(command: list[str], limit: int) -> tuple[int | None, bytes]:
    """Run *command* and read at most *limit* bytes of its output.

    Returns its exit status and output, or None and what was read if it printed more (it is
    killed then: an answer is one path, and a runaway program must not fill the daemon's
    memory). Killed too when cancelled (e.g. by a time limit).
    """
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    out = bytearray()
    try:
        async with process.stdout:
            while len(out) <= limit:
                chunk = await process.stdout.receive_some(limit + 1 - len(out))
                if not chunk:
                    break
                out += chunk
        if len(out) > limit:
            return None, bytes(out[:limit])
        return await process.wait(), bytes(out)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
