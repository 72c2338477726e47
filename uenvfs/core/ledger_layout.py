"""The shared ledger's memfd (core/shared_ledger.py): its layout, and how a new server reads it.

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

The next server may be of the version before or after this one (`uenvfs restart`): change
this layout only with the format number in the header. Format 2 (this one) is format 1 with
numbers handed out again and the opener's uid in every slot; format 1 ledgers are read (their
uids are 0: counted as root's) and carried on as format 2. A uenvfs that knows format 1 only
refuses a format 2 ledger (`not a uenvfs ledger of format 1`; a restart to it fails and the
server before serves on): going back to it takes a stop and start.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

from .ledger import (
    ALLOC,
    IDENTITY,
    IMAGE_DIR,
    NODE,
    VERSION,
    Contents,
    HandleKind,
    LedgerError,
    Slot,
)

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


class Header(NamedTuple):
    init_length: int
    resumes: int
    active: int  # the log's active half
    used: tuple[int, int]  # the bytes used of each half
    slots: int  # the slots ever used (high-water)


def header(memory: mmap.mmap) -> Header:
    """The header of the ledger in *memory*. Raises `LedgerError` if it is not one."""
    magic, fmt, init_length, resumes, active, _, used0, used1, slots = HEADER.unpack_from(
        memory, 0)
    if magic != MAGIC or fmt not in FORMATS:
        raise LedgerError(f"not a uenvfs ledger of format {' or '.join(map(str, FORMATS))}")
    return Header(init_length, resumes, active, (used0, used1), slots)


def records(memory: mmap.mmap, half: int, used: int) -> Iterator[tuple[int, int, int, bytes]]:
    """The records of the log's *half*, of which *used* bytes are written: kind, flag,
    number, data."""
    at = LOG_AT + half * LOG
    end = at + used
    while at + RECORD.size <= end:
        kind, flag, length, number = RECORD.unpack_from(memory, at)
        at += RECORD.size
        yield kind, flag, number, bytes(memory[at:at + length])
        at += length


def holders(memory: mmap.mmap) -> Counter[tuple[HandleKind, int]]:
    """How many live handles (not dead) of each kind each uid holds, by the slots."""
    held: Counter[tuple[HandleKind, int]] = Counter()
    for index in range(header(memory).slots):
        _, kind, flags, _, _, word, ino, _ = SLOT.unpack_from(memory, SLOTS_AT + index * SLOT.size)
        if kind != HandleKind.FREE and not flags & DEAD:
            held[HandleKind(kind), ino & 0xFFFFFFFF if kind == HandleKind.DATA else word] += 1
    return held


def read(memory: mmap.mmap, spare: Callable[[HandleKind, int], bool] | None = None) -> Contents:
    """Everything in the ledger in *memory*. Raises `LedgerError` if it is not one.

    *spare* (kind, uid): the live handles not to restore (a server that cannot afford
    them): each is marked dead in the ledger (freed if pending: its opener may never have
    got it) and counted in `Contents.spared` instead of read, so it costs no memory."""
    init_length, resumes, active, used, slots = header(memory)
    contents = Contents(bytes(memory[INIT_AT:INIT_AT + init_length]), resumes)
    allocs: dict[int, str] = {}
    for kind, flag, number, data in records(memory, active, used[active]):
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
            memory, SLOTS_AT + index * SLOT.size)
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
                memory[at + KIND_AT] = 0
            else:
                memory[at + FLAGS_AT] |= DEAD
            contents.spared[kind, uid] += 1
            continue
        contents.handles.append(Slot(
            gen << 32 | index, kind, bool(flags & DEAD), allocs.get(alloc, ""), ino, pid,
            uid=uid, data_ino=data_ino, pending=bool(flags & PENDING)))
    return contents
