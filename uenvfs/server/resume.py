"""A server taking over a live connection: what it got from the keeper, and how it carries on
from the ledger (see core/ledger.py: its image versions, nodes and open handles) and, after a
planned restart, from what the old server handed over (see server/handover.py)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
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
    RootDirHandle,
)
from ..fuse.inodes import backing_path
from ..fuse.root import ControlHandle
from ..kernel import mountinfo, procscan

if TYPE_CHECKING:
    from ..fuse.fs import UenvFS
    from ..manager.manager import Manager

log = logging.getLogger(__name__)

IMAGE_KINDS = (HandleKind.FILE, HandleKind.DIR)  # the kinds of handle counted as uses of images


@dataclass
class Resume:
    """What the keeper handed a server that takes over a live connection."""

    fuse: int
    ledger: SharedLedger
    lock: int  # -1: none (systemd's store keeps no lock): take it anew
    standby: bool = False  # started by `restart`: take over once the old server stopped

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


def restore_handles(fs: UenvFS, contents: Contents, ledger: SharedLedger,
                    mountpoint: Path) -> None:
    """The handles the last server opened, again in use with their numbers; those into images
    counted again for their allocations."""
    slots = settle(contents.handles, ledger, mountinfo.device_at(mountpoint), procscan.holds_of)
    shown = []
    counted = 0
    for slot in slots:
        if slot.kind == HandleKind.DATA:
            shown.append(slot)  # after the counts: they show them
            continue
        handle = _restored(fs, slot)
        counted += isinstance(handle, (FileHandle, DirHandle))
        fs.handles.restore(slot.fh, handle)
    for slot in shown:
        fs.handles.restore(slot.fh, fs.root.data(slot.data_ino))
    log.info("resumed the connection (resume %d): %d nodes, %d handles (%d counted)",
             contents.resumes + 1, len(contents.nodes), len(slots), counted)


def _restored(fs: UenvFS, slot: Slot) -> Handle:
    """The handle of *slot* (not a DATA one) in this server; a handle into an image counts as
    a use of it again, or answers EIO if its image version is no longer mounted."""
    if slot.kind == HandleKind.ROOT_DIR:
        return RootDirHandle(fs.root.entries())
    if slot.kind == HandleKind.CONTROL:
        return ControlHandle(slot.pid, slot.uid, slot.alloc, fs.root)
    node = fs.inodes.get(slot.ino)
    mount = None if node is None else fs.images.mounted(node.image)
    if (slot.dead or node is None or mount is None or not slot.alloc
            or (node.prefix and node.prefix != mount.version.prefix)):
        return DeadHandle()
    use = fs.images.open(node.image, slot.alloc)
    if slot.kind == HandleKind.DIR:
        return DirHandle(node.image, use, node, None)
    _, path = backing_path(node, mount)
    return ReopenedFileHandle(node.image, use, node.ino, -1, fs.prefetcher, fs.budget,
                              slot.alloc, path=path, guarded=mount.guarded)


def settle(slots: list[Slot], ledger: SharedLedger, dev: int | None,
           holds_of: Callable[[int, int], list[procscan.Hold]]) -> list[Slot]:
    """The handles to restore. A pending one (the last server died around its answer) is
    the kernel's only if the process that opened it holds it now: one that never got it
    waits for the open the kernel sends again (FUSE_NOTIFY_RESEND), and one that got it and
    closed it already sends its release, for a handle no longer counted either way."""
    pending = [s for s in slots if s.pending and s.kind in IMAGE_KINDS]
    if not pending:
        return slots
    confirmed = Counter((s.pid, s.ino) for s in slots if not s.pending and s.kind in IMAGE_KINDS)
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
