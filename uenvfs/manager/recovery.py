"""Start-up recovery: what to adopt, from the mount table and the journal (invariant WI6 of
docs/interface.md: after a restart the state is rebuilt, and nothing is mounted twice).

Pure: `plan` decides from a journal and mountinfo entries; the daemon carries it out. The mount
table is the authority: a backing mount that is there is adopted (never mounted twice), whether
or not the journal knows it; a journal entry whose mount is gone is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.names import valid_name
from ..kernel.mountinfo import MountEntry
from .journal import Journal, MountRecord


@dataclass(frozen=True)
class Adoption:
    """A backing mount found at start-up, to be served again with refcount 0 (hold timer)."""

    name: str
    backing: Path
    source: str
    image_path: str | None  # None: unknown, look the name up in the image sources
    record: MountRecord | None  # what the journal knew about it
    device: int = 0  # st_dev of its files, as the mount table says


@dataclass
class Plan:
    adopt: list[Adoption] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # journal entries whose mount is gone
    detach: list[MountEntry] = field(default_factory=list)  # not ours to serve: unmount

    def summary(self) -> str:
        known = [a.name for a in self.adopt if a.record is not None]
        unknown = [a.name for a in self.adopt if a.record is None]
        acquired = sum(len(a.record.acquired) for a in self.adopt if a.record is not None)
        parts = [f"adopted {len(self.adopt)} backing mounts"
                 + (f" ({', '.join(known)})" if known else ""),
                 f"{len(unknown)} not in the journal" + (f" ({', '.join(unknown)})"
                                                          if unknown else ""),
                 f"{acquired} acquisitions restored",
                 f"{len(self.dropped)} stale journal entries dropped"
                 + (f" ({', '.join(self.dropped)})" if self.dropped else "")]
        if self.detach:
            parts.append(f"{len(self.detach)} stray mounts to detach")
        return "; ".join(parts)


def plan(
    journal: Journal | None,
    entries: Sequence[MountEntry],
    backing_root: Path,
    loop_file: Callable[[str], str | None] = lambda source: None,
) -> Plan:
    """What to do at start-up. *loop_file* names the image behind a loop device, if known."""
    result = Plan()
    records = dict(journal.mounts) if journal else {}
    prefix = str(backing_root) + "/"
    found: dict[str, MountEntry] = {}
    for entry in entries:
        if not entry.mount_point.startswith(prefix):
            continue
        name = entry.mount_point[len(prefix):]
        if "/" in name or not valid_name(name):
            result.detach.append(entry)  # something mounted deeper or under a foreign name
            continue
        if name in found:
            result.detach.append(found[name])  # stacked twice: keep the topmost only
        found[name] = entry
    for name, entry in sorted(found.items()):
        record = records.pop(name, None)
        image_path = record.image_path if record else loop_file(entry.source)
        result.adopt.append(Adoption(name, Path(entry.mount_point), entry.source, image_path,
                                     record, entry.device))
    result.dropped = sorted(records)
    return result


def loop_backing_file(source: str, sys_block: Path = Path("/sys/block")) -> str | None:
    """The file behind /dev/loopN, from sysfs (None if not a loop device or deleted)."""
    if not source.startswith("/dev/loop"):
        return None
    try:
        text = (sys_block / source.removeprefix("/dev/") / "loop" / "backing_file").read_text()
    except OSError:
        return None
    path = text.strip()
    return None if path.endswith(" (deleted)") else path
