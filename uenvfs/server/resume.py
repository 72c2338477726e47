"""A server taking over a live connection: what it got from the keeper, and how it carries on
from the ledger (see core/ledger.py: its image versions, nodes and open handles) and, after a
planned restart, from what the old server handed over (see server/handover.py).

A server that died before it served (while restoring handles, say), or that the OOM killer
killed, must not be followed by one that restores the same and dies the same way (and so on:
a crash loop in which no job is answered). The keeper says how the last one died (ENV_DIED);
the next one then restores less (`Sparing`), one step more after each such death: the
handles that keep snapshots (`.status`, `.metrics`, the mount root) answer EIO instead; then
all the handles of the uid that holds the most (root's last). Each step is logged. A handle
spared so is marked dead in the ledger, never read into memory (see `read_ledger`), and the
next server spares one step more than that.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import StartupError
from ..core.ledger import Contents, HandleKind, Slot
from ..core.shared_ledger import SharedLedger
from ..fuse.handles import (
    DeadHandle,
    DirHandle,
    FileHandle,
    Handle,
    ReopenedFileHandle,
)
from ..fuse.inodes import backing_path
from ..fuse.root import ControlHandle
from ..kernel import mountinfo, procscan

if TYPE_CHECKING:
    from ..fuse.fs import UenvFS
    from ..manager.manager import Manager

log = logging.getLogger(__name__)

IMAGE_KINDS = (HandleKind.FILE, HandleKind.DIR)  # the kinds of handle counted as uses of images
SNAPSHOT_KINDS = (HandleKind.DATA, HandleKind.ROOT_DIR)  # the kinds that keep a snapshot


@dataclass
class Resume:
    """What the keeper handed a server that takes over a live connection."""

    fuse: int
    ledger: SharedLedger
    lock: int  # -1: none (systemd's store keeps no lock): take it anew
    standby: bool = False  # started by `restart`: take over once the old server stopped
    death: Death | None = None  # how the last server died, if the keeper said (ENV_DIED)

    @classmethod
    def from_env(cls, text: str) -> Resume:
        fuse, ledger, lock = (int(part) for part in text.split(","))
        for fd in (fuse, ledger, lock):
            if fd >= 0:
                os.set_inheritable(fd, False)
        try:
            return cls(fuse, SharedLedger(ledger), lock)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot read the ledger of the connection: {exc}") from exc


def restore_versions(manager: Manager, fs: UenvFS, contents: Contents) -> None:
    """The inode prefixes the last server handed out: the same numbers mean the same files."""
    fs.inodes.prefixes.continue_after(contents.last_prefix)
    manager.mounter.restore(contents.versions)
    fs.inodes.restore(contents)


@dataclass(frozen=True)
class Death:
    """How the last server died, as the keeper tells (ENV_DIED): its exit `status` (negative:
    a signal; None: unknown), whether the OOM killer killed it, and how many servers in a
    row died `before_serving` (it among them)."""

    status: int | None
    oom: bool
    before_serving: int

    @classmethod
    def from_env(cls, text: str | None) -> Death | None:
        if not text:
            return None
        try:
            found = json.loads(text)
            return cls(found["status"], bool(found["oom"]), int(found["before_serving"]))
        except (ValueError, KeyError, TypeError):
            log.warning("cannot read how the last server died (%r): restoring everything", text)
            return None

    def __str__(self) -> str:
        how = ("was killed by the OOM killer" if self.oom else
               "died" if self.status is None else
               f"was killed by signal {-self.status}" if self.status < 0 else
               f"exited with status {self.status}")
        if self.before_serving:
            how += f" ({self.before_serving} servers in a row died before they served)"
        return how


@dataclass
class Sparing:
    """The live handles a server does not restore after the last one died (they answer EIO):
    those that keep snapshots if `snapshots`, and every handle of the uids in `uids`."""

    snapshots: bool = False
    uids: set[int] = field(default_factory=set)

    @classmethod
    def after(cls, death: Death | None, held: Counter[tuple[HandleKind, int]]) -> Sparing:
        """What to spare after *death* (None: the last server did not die), with *held* the
        live handles by kind and uid: one step more than the servers before spared (theirs
        are dead in the ledger already). A step is taken after an OOM kill, or after the
        third server in a row killed by a signal before it served (a crash loop of unknown
        cause: a watchdog, an OOM kill where the keeper cannot count them); never after an
        exit (a start-up error, which sparing handles would not mend). The steps: the
        handles that keep snapshots, if there are any; else those of the uid that holds the
        most, root's last."""
        if death is None or not (death.oom or (
                death.before_serving >= 3 and death.status is not None and death.status < 0)):
            return cls()
        if any(kind in SNAPSHOT_KINDS for kind, _ in held):
            return cls(snapshots=True)
        by_uid: Counter[int] = Counter()
        for (_, uid), count in held.items():
            by_uid[uid] += count
        biggest = [uid for uid, _ in by_uid.most_common() if uid] or list(by_uid)
        return cls(uids=set(biggest[:1]))

    def __bool__(self) -> bool:
        return self.snapshots or bool(self.uids)

    def spares(self, kind: HandleKind, uid: int) -> bool:
        return uid in self.uids or (self.snapshots and kind in SNAPSHOT_KINDS)


def read_ledger(ledger: SharedLedger, death: Death | None) -> Contents:
    """What the *ledger* of the last server holds; after its *death*, less what this server
    cannot afford (see `Sparing`): those handles are not even read, and answer EIO."""
    sparing = Sparing.after(death, ledger.holders() if death is not None else Counter())
    contents = ledger.read(sparing.spares if sparing else None)
    if contents.spared:
        whose: Counter[str] = Counter()
        for (_, uid), count in contents.spared.items():
            if uid in sparing.uids:
                whose[f"of uid {uid}"] += count
            else:
                whose["of .status, .metrics and the mount root (they keep snapshots)"] += count
        log.error("the last server %s: so as not to die the same way, %d handles answer EIO "
                  "from now on, not restored: %s", death, sum(whose.values()),
                  ", ".join(f"{count} {who}" for who, count in sorted(whose.items())))
    return contents


def restore_handles(fs: UenvFS, contents: Contents, ledger: SharedLedger,
                    mountpoint: Path) -> None:
    """The handles the last server opened, again in use with their numbers; those into images
    counted again for their allocations, every one taken from the shares of its opener's
    uid."""
    slots = settle(contents.handles, ledger, mountinfo.device_at(mountpoint), procscan.holds_of)
    shown = []
    counted = 0
    for slot in slots:
        if slot.kind == HandleKind.DATA and not slot.dead:
            shown.append(slot)  # after the counts: they show them
            continue
        handle = _restored(fs, slot)
        counted += isinstance(handle, (FileHandle, DirHandle))
        fs.handles.restore(slot.fh, handle)
    for slot in shown:
        fs.handles.restore(slot.fh, fs.root.restored(slot.data_ino, slot.uid))
    log.info("resumed the connection (resume %d): %d nodes, %d handles (%d counted)",
             contents.resumes + 1, len(contents.nodes), len(slots), counted)


def _restored(fs: UenvFS, slot: Slot) -> Handle:
    """The handle of *slot* (not a live DATA one) in this server, taken from the shares of
    its uid; a handle into an image counts as a use of it again, or answers EIO if its image
    version is no longer mounted."""
    if slot.dead:
        return DeadHandle()
    if slot.kind == HandleKind.ROOT_DIR:
        return fs.root.open_dir(slot.uid, restored=True)
    if slot.kind == HandleKind.CONTROL:
        fs.shares.take(slot.uid, slot.alloc, restored=True)
        return ControlHandle(slot.pid, slot.uid, slot.alloc, fs.root)
    node = fs.inodes.get(slot.ino)
    mount = None if node is None else fs.images.mounted(node.image)
    if (node is None or mount is None or not slot.alloc
            or (node.prefix and node.prefix != mount.version.prefix)):
        return DeadHandle()
    use = fs.images.open(node.image, slot.alloc)
    if slot.kind == HandleKind.DIR:
        fs.shares.take(slot.uid, slot.alloc, restored=True)
        return DirHandle(node.image, use, slot.uid, node, None)
    fs.shares.take(slot.uid, slot.alloc, held=False, restored=True)
    _, path = backing_path(node, mount)
    return ReopenedFileHandle(node.image, use, slot.uid, node.ino, -1, fs.prefetcher,
                              fs.budget, slot.alloc, path=path, guarded=mount.guarded)


def settle(slots: list[Slot], ledger: SharedLedger, dev: int | None,
           holds_of: Callable[[int, int], list[procscan.Hold]]) -> list[Slot]:
    """The handles to restore. A pending one (the last server died around its answer) is
    the kernel's only if the process that opened it holds it now: one that never got it
    waits for the open the kernel sends again (FUSE_NOTIFY_RESEND), and one that got it and
    closed it already sends its release, for a handle no longer counted either way."""
    pending = [s for s in slots if s.pending and s.kind in IMAGE_KINDS]
    if not pending:
        return slots
    keys = {(s.pid, s.ino) for s in pending}
    confirmed = Counter(key for s in slots if not s.pending and s.kind in IMAGE_KINDS
                        and (key := (s.pid, s.ino)) in keys)
    room: dict[tuple[int, int], int] = {}
    for slot in pending:
        key = (slot.pid, slot.ino)
        if key not in room:
            held = procscan.opens_of(holds_of(slot.pid, dev), slot.ino) if dev else 0
            room[key] = max(0, held - confirmed[key])
    kept = []
    for slot in slots:
        if slot.pending and slot.kind in IMAGE_KINDS:
            key = (slot.pid, slot.ino)
            if room[key] <= 0:
                log.info("handle %#x: its opener (pid %d) never got it; dropped", slot.fh,
                         slot.pid)
                ledger.released(slot.fh)
                continue
            room[key] -= 1
            ledger.confirm(slot.fh)
        kept.append(slot)
    return kept


def read_handed(fd: int | None) -> dict[str, Any] | None:
    """The state the old server handed over in the memfd *fd* (None: it died instead)."""
    if fd is None:
        log.warning("the old server died before it handed over: resuming as after a crash")
        return None
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        document: dict[str, Any] = json.loads(b"".join(chunks))
        return document
    except (OSError, ValueError) as exc:
        log.error("cannot read the state the old server handed over (%s): resuming as after "
                  "a crash", exc)
        return None
    finally:
        os.close(fd)
