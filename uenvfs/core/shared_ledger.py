"""The ledger in shared memory (a memfd), as the keeper holds it between servers; what the
ledger is for: core/ledger.py.

Layout of the memfd (sparse: only what is written takes memory)::

    0         header: magic, format, INIT request, resumes, the log's active half and
              used bytes, the handle slots in use
    4 KiB     SLOTS handle slots of 32 bytes: a handle number is gen << 32 | slot
    + 32 MiB  two halves of LOG bytes: records appended to the active half; when it fills
              up, the live records are written to the other half, which becomes active

A slot: gen (u32), kind (u8, `HandleKind`), flags (u8), pad (u16), allocation number (u32),
the opener's uid or, for DATA, the file shown (u32), node id or, for DATA, the opener's uid
(u64), the opener's pid (u64). A record is appended first and counted (`used`) after, so one
half-written at a crash is not read. A log record: kind (u8), flag (u8), length (u16), a
number (u64), then `length` bytes.

The log keeps an ALLOC record (number, name) for each allocation that a slot uses: once no slot
uses a number, it is forgotten (at the latest at the next compaction, which no longer copies
its record: core/numbers.py) and handed out again for the next new name, in a new record: the
last record of a number names it. So made-up names cannot fill the log, and the records of
allocations in use are bounded by the handles (fuse/shares.py bounds the allocations of each
uid).

The next server may be of the version before or after this one (`uenvfs restart`): change
this layout only with the format number in the header. Format 2 (this one) is format 1 with
numbers handed out again and the opener's uid in every slot; format 1 ledgers are read (their
uids are 0: counted as root's) and carried on as format 2. A uenvfs that knows format 1 only
refuses a format 2 ledger (`not a uenvfs ledger of format 1`; a restart to it fails and the
server before serves on): going back to it takes a stop and start.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from .ledger import (
    ALLOC,
    IDENTITY,
    IMAGE_DIR,
    NODE,
    VERSION,
    Contents,
    HandleKind,
    Ledger,
    LedgerError,
    LogRecord,
    Slot,
    image_dir_record,
    node_record,
    version_record,
)
from .numbers import AllocationNumbers

log = logging.getLogger(__name__)

MAGIC = b"UENVLDG1"
FORMAT = 2
FORMATS = (1, 2)  # read
HEADER = struct.Struct("=8sIIQBBxxxxxxQQQ")  # magic, format, init length, resumes,
# active half, initialized, pad, used[0], used[1], slots in use (high-water)
ACTIVE_AT, INITIALIZED_AT, USED_AT, SLOTS_USED_AT = 24, 25, 32, 48  # offsets
HEADER_SIZE = 4096
INIT_AT = 512  # the INIT request (at most 512 bytes) sits here
SLOTS = 1 << 20
SLOT = struct.Struct("=IBBHIIQQ")  # gen, kind, flags, pad, alloc, uid or data ino, node, pid
GEN = NUMBER = struct.Struct("=I")  # a slot's first field; its allocation number
HEAD = struct.Struct("=IBBHI")  # a slot's fields up to its allocation number
SLOT_SIZE = SLOT.size
DATA = int(HandleKind.DATA)  # plain numbers: an enum member is a slow look-up in Python 3.11
KIND_AT, FLAGS_AT, ALLOC_AT = 4, 5, 8  # offsets in a slot
SLOTS_AT = HEADER_SIZE
LOG_AT = SLOTS_AT + SLOTS * SLOT.size
LOG = 32 << 20  # about 600,000 nodes of paths 40 bytes long
SIZE = LOG_AT + 2 * LOG
RECORD = struct.Struct("=BBHQ")


DEAD = 1  # flag: force-unmounted, answers EIO
PENDING = 2  # flag: the answer that gives the handle to the kernel may not have reached it


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

    def _read_header(self) -> tuple[int, int, int, tuple[int, int], int]:
        magic, fmt, init_length, resumes, active, _, used0, used1, slots = HEADER.unpack_from(
            self.map, 0)
        if magic != MAGIC or fmt not in FORMATS:
            raise LedgerError(f"not a uenvfs ledger of format {' or '.join(map(str, FORMATS))}")
        return init_length, resumes, active, (used0, used1), slots

    def _header(self, *, init_length: int, resumes: int, active: int,
                used: tuple[int, int], slots: int) -> None:
        HEADER.pack_into(self.map, 0, MAGIC, FORMAT, init_length, resumes, active,
                         self.map[INITIALIZED_AT], *used, slots)

    # -- reading, by a new server ----------------------------------------------------------

    def holders(self) -> Counter[tuple[HandleKind, int]]:
        """How many live handles (not dead) of each kind each uid holds, by the slots."""
        held: Counter[tuple[HandleKind, int]] = Counter()
        for index in range(self._read_header()[4]):
            _, kind, flags, _, _, word, ino, _ = SLOT.unpack_from(self.map,
                                                                 SLOTS_AT + index * SLOT.size)
            if kind != HandleKind.FREE and not flags & DEAD:
                held[HandleKind(kind), ino & 0xFFFFFFFF if kind == HandleKind.DATA else word] += 1
        return held

    def read(self, spare: Callable[[HandleKind, int], bool] | None = None) -> Contents:
        """Everything in the ledger. Raises `LedgerError` if it is not one.

        *spare* (kind, uid): the live handles not to restore (a server that cannot afford
        them): each is marked dead in the ledger (freed if pending: its opener may never have
        got it) and counted in `Contents.spared` instead of read, so it costs no memory."""
        init_length, resumes, active, used, slots = self._read_header()
        contents = Contents(bytes(self.map[INIT_AT:INIT_AT + init_length]), resumes)
        allocs: dict[int, str] = {}
        for kind, flag, number, data in self._records(active, used[active]):
            if kind == NODE:
                contents.nodes[number] = (data, bool(flag))
            elif kind == IMAGE_DIR:
                contents.image_dirs[data.decode()] = number
            elif kind == VERSION:
                identity = IDENTITY.unpack_from(data)
                name = data[IDENTITY.size:].decode()
                contents.versions[number] = (name, identity, bool(flag))
            elif kind == ALLOC:
                allocs[number] = data.decode()
        for index in range(slots):
            gen, byte, flags, _, alloc, word, ino, pid = SLOT.unpack_from(
                self.map, SLOTS_AT + index * SLOT.size)
            if byte == HandleKind.FREE:
                continue
            try:
                kind = HandleKind(byte)
            except ValueError:
                raise LedgerError(f"a handle of unknown kind {byte} in slot {index}") from None
            if kind == HandleKind.DATA:  # the file shown, and the opener's uid
                uid, data_ino, ino = ino & 0xFFFFFFFF, word, 0
            else:
                uid, data_ino = word, 0
            if spare is not None and not flags & DEAD and spare(kind, uid):
                at = SLOTS_AT + index * SLOT.size
                if flags & PENDING:
                    self.map[at + KIND_AT] = 0
                else:
                    self.map[at + FLAGS_AT] |= DEAD
                contents.spared[kind, uid] += 1
                continue
            contents.handles.append(Slot(
                gen << 32 | index, kind, bool(flags & DEAD), allocs.get(alloc, ""), ino, pid,
                uid=uid, data_ino=data_ino, pending=bool(flags & PENDING)))
        return contents

    def _records(self, half: int, used: int) -> Iterator[tuple[int, int, int, bytes]]:
        at = LOG_AT + half * LOG
        end = at + used
        while at + RECORD.size <= end:
            kind, flag, length, number = RECORD.unpack_from(self.map, at)
            at += RECORD.size
            yield kind, flag, number, bytes(self.map[at:at + length])
            at += length

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
        init_length, resumes, active, used, slots = self._read_header()
        self._header(init_length=init_length, resumes=resumes + 1, active=active, used=used,
                     slots=slots)
        self._active, self._used, self._slots = active, used[active], slots
        names: dict[int, str] = {}
        for kind, _, number, data in self._records(active, used[active]):
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
        if self._used + size > LOG and (self._compacting or not self._compact()):
            self.full = True
            return False
        at = LOG_AT + self._active * LOG + self._used
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
            self._active, self._used = old, self._read_header()[3][old]
            log.error("the ledger's log is full: nodes looked up from now on cannot be "
                      "resumed after a crash")
            return False
        self._logged = logged
        self.map[ACTIVE_AT] = new  # the switch: one byte, after the new half is complete
        self.map.madvise(mmap.MADV_REMOVE, LOG_AT + old * LOG, LOG)  # give the memory back
        log.info("ledger: %d live bytes of %d compacted in %.3f s", self._used, LOG,
                 time.monotonic() - started)
        if self._used > LOG * 3 // 4:
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
