"""The ledger in shared memory (a memfd), as the keeper holds it between servers; what the
ledger is for: core/ledger.py; the memfd's layout, and how a new server reads it:
core/ledger_layout.py.

The log keeps an ALLOC record (number, name) for each allocation that a slot uses: once no slot
uses a number, it is forgotten (at the latest at the next compaction, which no longer copies
its record: core/numbers.py) and handed out again for the next new name, in a new record: the
last record of a number names it. So made-up names cannot fill the log, and the records of
allocations in use are bounded by the handles (fuse/shares.py bounds the allocations of each
uid).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable

from . import ledger_layout as layout
from .ledger import (
    ALLOC,
    NODE,
    Contents,
    HandleKind,
    Ledger,
    LedgerError,
    LogRecord,
    image_dir_record,
    node_record,
    version_record,
)

# The layout by name: module globals are the quickest look-up on the handles' hot path. LOG
# and the reading functions through `layout`, so that a test that shrinks LOG shrinks it for
# both the writer and the reader.
from .ledger_layout import (
    ACTIVE_AT,
    ALLOC_AT,
    DATA,
    DEAD,
    FLAGS_AT,
    FORMAT,
    GEN,
    HEAD,
    HEADER,
    HEADER_SIZE,
    INIT_AT,
    INITIALIZED_AT,
    KIND_AT,
    LOG_AT,
    MAGIC,
    NUMBER,
    PENDING,
    RECORD,
    SIZE,
    SLOT,
    SLOT_SIZE,
    SLOTS,
    SLOTS_AT,
    SLOTS_USED_AT,
    USED_AT,
)
from .numbers import AllocationNumbers

log = logging.getLogger(__name__)


class SharedLedger(Ledger):
    """The ledger in the memfd *fd* (kept open: it is handed to the next server)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        if os.fstat(fd).st_size < SIZE:
            os.ftruncate(fd, SIZE)
        self.map = mmap.mmap(fd, SIZE)
        self.numbers = AllocationNumbers(self._name_number)  # of the allocations slots use
        self._free: list[int] = []
        self.full = False  # the log could not take a record: resuming would miss some nodes
        # What a compaction keeps: every node, image directory and version in use (named
        # by the parts that write them, see `keep`: InodeTable and Mounter).
        self._live: list[Callable[[], Iterable[LogRecord]]] = []
        self._compacting = False
        self._logged: set[int] = set()  # the node ids in the log

    @classmethod
    def create(cls, init: bytes) -> SharedLedger:
        """A new, empty ledger for the connection whose INIT request is *init*."""
        if len(init) > HEADER_SIZE - INIT_AT:
            raise LedgerError(f"INIT request of {len(init)} bytes")
        fd = os.memfd_create("uenvfs-ledger", os.MFD_CLOEXEC)
        ledger = cls(fd)
        ledger.map[INIT_AT:INIT_AT + len(init)] = init
        ledger._header(init_length=len(init), resumes=0, active=0, used=(0, 0), slots=0)
        return ledger

    # -- the header ---------------------------------------------------------------------

    def _header(self, *, init_length: int, resumes: int, active: int,
                used: tuple[int, int], slots: int) -> None:
        HEADER.pack_into(self.map, 0, MAGIC, FORMAT, init_length, resumes, active,
                         self.map[INITIALIZED_AT], *used, slots)

    # -- reading, by a new server ----------------------------------------------------------

    def holders(self) -> Counter[tuple[HandleKind, int]]:
        """How many live handles (not dead) of each kind each uid holds, by the slots."""
        return layout.holders(self.map)

    def read(self, spare: Callable[[HandleKind, int], bool] | None = None) -> Contents:
        """Everything in the ledger (`ledger_layout.read`: *spare* says which live handles
        not to restore). Raises `LedgerError` if it is not one."""
        return layout.read(self.map, spare)

    @property
    def initialized(self) -> bool:
        """Whether a server answered the connection's INIT (then the kernel never sends it
        again, and the requests a dead server read can be queued again)."""
        return bool(self.map[INITIALIZED_AT])

    def mark_initialized(self) -> None:
        self.map[INITIALIZED_AT] = 1

    def resumed(self, contents: Contents) -> None:
        """A new server takes over this ledger, whose *contents* it `read`: count the resume
        and carry on with its handles and allocations."""
        init_length, resumes, active, used, slots = layout.header(self.map)
        self._header(init_length=init_length, resumes=resumes + 1, active=active, used=used,
                     slots=slots)
        self._active, self._used, self._slots = active, used[active], slots
        names: dict[int, str] = {}
        for kind, _, number, data in layout.records(self.map, active, used[active]):
            if kind == ALLOC:
                names[number] = data.decode()  # the last record of a number names it
        uses: Counter[int] = Counter()
        for index in range(slots):
            kind, _, _, alloc = SLOT.unpack_from(self.map, SLOTS_AT + index * SLOT.size)[1:5]
            if kind == HandleKind.FREE:
                self._free.append(index)
            elif alloc:  # (without a record if the log was full: kept from reuse all the same)
                uses[alloc] += 1
        self._free.reverse()
        self.numbers = AllocationNumbers(self._name_number, uses, names)
        self._logged = set(contents.nodes)

    # -- writing ------------------------------------------------------------------------

    def start(self) -> None:
        """Start writing an empty ledger (made by `create`)."""
        self._active, self._used, self._slots = 0, 0, 0

    def keep(self, live: Callable[[], Iterable[LogRecord]]) -> None:
        self._live.append(live)

    def _append(self, kind: int, flag: int, number: int, data: bytes) -> bool:
        """Append a record; False if the log has no room for it (it is full)."""
        size = RECORD.size + len(data)
        if self._used + size > layout.LOG and (self._compacting or not self._compact()):
            self.full = True
            return False
        at = LOG_AT + self._active * layout.LOG + self._used
        RECORD.pack_into(self.map, at, kind, flag, len(data), number)
        self.map[at + RECORD.size:at + size] = data
        self._used += size
        struct.pack_into("=Q", self.map, USED_AT + 8 * self._active, self._used)
        return True

    @property
    def log_bytes(self) -> int:
        """The bytes of the active half of the log in use."""
        return self._used

    def _compact(self) -> bool:
        """The active half is full: write what is live (`live()`, and the allocations) to
        the other half, which becomes the active one. False if even that leaves no room:
        nodes looked up from then on would not be found by a server after a crash."""
        if self.full:
            return False
        started = time.monotonic()
        self._compacting = True
        old, new = self._active, 1 - self._active
        self._active, self._used = new, 0
        struct.pack_into("=Q", self.map, USED_AT + 8 * new, 0)
        logged = set()
        for kind, flag, number, data in itertools.chain.from_iterable(f() for f in self._live):
            self._append(kind, flag, number, data)
            if kind == NODE:
                logged.add(number)
        self.numbers.forget_idle()
        for alloc, number in self.numbers.by_name.items():
            self._append(ALLOC, 0, number, alloc.encode())
        self._compacting = False
        if self.full:  # what is live does not fit: keep the old half, and stop adding
            self._active, self._used = old, layout.header(self.map).used[old]
            log.error("the ledger's log is full: nodes looked up from now on cannot be "
                      "resumed after a crash")
            return False
        self._logged = logged
        self.map[ACTIVE_AT] = new  # the switch: one byte, after the new half is complete
        # Give the memory of the old half back.
        self.map.madvise(mmap.MADV_REMOVE, LOG_AT + old * layout.LOG, layout.LOG)
        log.info("ledger: %d live bytes of %d compacted in %.3f s", self._used, layout.LOG,
                 time.monotonic() - started)
        if self._used > layout.LOG * 3 // 4:
            self.full = True
            log.error("the ledger's log is full (%d bytes live): nodes looked up from now on "
                      "cannot be resumed after a crash", self._used)
        return not self.full

    def node(self, ino: int, rel: bytes, is_dir: bool) -> None:
        # Once per inode: looked up again after the kernel forgot it, it has a path already
        # (an image never changes, so any of its paths stays right).
        if ino not in self._logged:
            self._logged.add(ino)
            self._append(*node_record(ino, rel, is_dir))

    def image_dir(self, prefix: int, name: str) -> None:
        self._append(*image_dir_record(prefix, name))

    def version(self, prefix: int, name: str, identity: tuple[int, int, int, int],
                validated: bool) -> None:
        self._append(*version_record(prefix, name, identity, validated))

    @property
    def allocations(self) -> dict[str, int]:
        """The allocations that slots use: name -> number."""
        return self.numbers.live()

    def _name_number(self, number: int, alloc: str) -> bool:
        """Name allocation *number* in the log (False if it has no room: that number is not
        given, and the handle is not restored after a crash)."""
        return self._append(ALLOC, 0, number, alloc.encode())

    def opened(self, kind: HandleKind, ino: int, alloc: str = "", pid: int = 0, *,
               uid: int = 0, data_ino: int = 0) -> int:
        if self._free:
            index = self._free.pop()
        elif self._slots < SLOTS:
            index = self._slots
            self._slots += 1
            struct.pack_into("=Q", self.map, SLOTS_USED_AT, self._slots)
        else:
            raise OSError(24, "too many open handles")  # EMFILE
        at = SLOTS_AT + index * SLOT_SIZE
        gen: int = (GEN.unpack_from(self.map, at)[0] + 1) & 0xFFFFFFFF  # it keeps its last one
        if kind == DATA:
            word, ino = data_ino, uid
        else:
            word = uid
        SLOT.pack_into(self.map, at, gen, kind, PENDING, 0,
                       self.numbers.take(alloc) if alloc else 0, word, ino, pid)
        return gen << 32 | index

    def confirm(self, fh: int) -> None:
        at = SLOTS_AT + (fh & 0xFFFFFFFF) * SLOT.size + FLAGS_AT
        self.map[at] &= ~PENDING & 0xFF

    def moved(self, fh: int, alloc: str) -> None:
        index = fh & 0xFFFFFFFF
        at = SLOTS_AT + index * SLOT.size
        if index < self._slots and GEN.unpack_from(self.map, at)[0] == fh >> 32:
            old = NUMBER.unpack_from(self.map, at + ALLOC_AT)[0]
            struct.pack_into("=I", self.map, at + ALLOC_AT, self.numbers.take(alloc))
            self.numbers.drop(old)

    def is_dead(self, fh: int) -> bool:
        index = fh & 0xFFFFFFFF
        at = SLOTS_AT + index * SLOT.size
        return (index < self._slots and GEN.unpack_from(self.map, at)[0] == fh >> 32
                and bool(self.map[at + KIND_AT]) and bool(self.map[at + FLAGS_AT] & DEAD))

    def killed(self, fh: int) -> None:
        index = fh & 0xFFFFFFFF
        at = SLOTS_AT + index * SLOT.size
        if SLOT.unpack_from(self.map, at)[0] == fh >> 32:
            self.map[at + FLAGS_AT] |= DEAD

    def released(self, fh: int) -> None:
        index = fh & 0xFFFFFFFF
        at = SLOTS_AT + index * SLOT_SIZE
        if index < self._slots:
            gen, kind, _, _, number = HEAD.unpack_from(self.map, at)
            if gen == fh >> 32 and kind:
                self.map[at + KIND_AT] = 0  # FREE
                self._free.append(index)
                self.numbers.drop(number)  # (0: none)

    def close(self) -> None:
        self.map.close()
