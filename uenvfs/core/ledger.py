"""The ledger: what a new server needs to answer the requests of a live connection.

The kernel goes on sending the node ids and file handles that the server before handed out
(see kernel/fusedev.py). A node id says which image version an inode belongs to and its inode
number in the backing mount, not its path; a file handle is a number. The ledger keeps, in
shared memory that outlives the server (a memfd held with the connection's descriptor, see
keeper/keeper.py):

  - the connection's INIT request, to start libfuse again;
  - every inode prefix handed out: the image directory of a name, the versions of an image;
  - the path in its image of every node id the kernel was given (an append-only log);
  - every open handle: its kind, its node, the allocation it counts for, who opened it (pid
    and uid), and the names of the allocations that handles count for.

Each is written before the answer that hands it to the kernel, so a server that dies at any
point leaves a ledger that names everything the kernel may ask about. A handle is written as
pending, and confirmed once the next handle is added or released (its answer is written by
then); after a crash, a new server keeps a pending one only if the process that opened it
holds it (see `settle` in server/resume.py): the kernel sends an open whose answer it never
got again. The writes are stores to memory (no system call): under a microsecond on the
requests that add something.

The memfd and its layout: core/shared_ledger.py.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum

# Log records
NODE, IMAGE_DIR, VERSION, ALLOC = 1, 2, 3, 4
IDENTITY = struct.Struct("=qqqq")

class HandleKind(IntEnum):
    """What an open handle is: a slot's kind (the format's numbers: never change one). Every
    slot keeps the pid and uid of the handle's opener; what else it holds depends on the
    kind."""

    FREE = 0  # a free slot
    FILE = 1  # a file of an image: its node id, the allocation it counts for
    DIR = 2  # a directory of an image: its node id, the allocation it counts for
    ROOT_DIR = 3  # the mount root: nothing else
    CONTROL = 4  # `.control`: its opener's allocation
    DATA = 5  # `.status` or `.metrics`: which one, by inode number


@dataclass(slots=True)
class Slot:
    """An open handle as the ledger has it (what each field holds by kind: `HandleKind`)."""

    fh: int
    kind: HandleKind
    dead: bool
    alloc: str  # the allocation it counts for; "" for none
    ino: int  # the node id of a FILE or DIR; 0 for the others
    pid: int = 0  # the process that opened it
    uid: int = 0  # its opener's uid (0 but for CONTROL in a ledger of format 1)
    data_ino: int = 0  # DATA: which file it shows, `.status` or `.metrics` (their inodes)
    pending: bool = False


@dataclass
class Contents:
    """Everything a ledger holds, read by a new server."""

    init: bytes
    resumes: int
    nodes: dict[int, tuple[bytes, bool]] = field(default_factory=dict)  # ino -> rel, is_dir
    image_dirs: dict[str, int] = field(default_factory=dict)  # name -> prefix
    versions: dict[int, tuple[str, tuple[int, int, int, int], bool]] = field(
        default_factory=dict)  # prefix -> name, identity, validated
    handles: list[Slot] = field(default_factory=list)
    spared: Counter[tuple[HandleKind, int]] = field(default_factory=Counter)  # not read: by
    # kind and uid, the live handles a server could not afford (now dead in the ledger)

    @property
    def last_prefix(self) -> int:
        return max([*self.image_dirs.values(), *self.versions, 0])


LogRecord = tuple[int, int, int, bytes]  # kind, flag, number, data


def node_record(ino: int, rel: bytes, is_dir: bool) -> LogRecord:
    return NODE, is_dir, ino, rel


def image_dir_record(prefix: int, name: str) -> LogRecord:
    return IMAGE_DIR, 0, prefix, name.encode()


def version_record(prefix: int, name: str, identity: tuple[int, int, int, int],
                   validated: bool) -> LogRecord:
    return VERSION, validated, prefix, IDENTITY.pack(*identity) + name.encode()


class LedgerError(Exception):
    """Not a ledger this uenvfs can read (another format, or none)."""


class Ledger:
    """A ledger that keeps nothing (a filesystem with no connection to resume: unit tests).
    Handles are numbered from 1 up."""

    fd = -1

    def __init__(self) -> None:
        self._next = 0

    def node(self, ino: int, rel: bytes, is_dir: bool) -> None:
        """The kernel is given node *ino*, the file at *rel* in its image."""

    def image_dir(self, prefix: int, name: str) -> None:
        """Image *name*'s directory has inode prefix *prefix*."""

    def version(self, prefix: int, name: str, identity: tuple[int, int, int, int],
                validated: bool) -> None:
        """A version of image *name* has inode prefix *prefix*."""

    def opened(self, kind: HandleKind, ino: int, alloc: str = "", pid: int = 0, *,
               uid: int = 0, data_ino: int = 0) -> int:
        """Record a new handle of *kind*, opened by process *pid* of *uid* (the other fields:
        see `HandleKind`), pending until `confirm`; returns its number."""
        self._next += 1
        return self._next

    def confirm(self, fh: int) -> None:
        """The answer that gave *fh* to the kernel was written: it is the kernel's."""

    def moved(self, fh: int, alloc: str) -> None:
        """The handle *fh* counts for *alloc* from now on (an executable: fuse/files.py)."""

    def is_dead(self, fh: int) -> bool:
        """Whether *fh* is a handle in the ledger that answers EIO (see `killed`)."""
        return False

    def killed(self, fh: int) -> None:
        """The handle *fh* answers EIO from now on (its image was force-unmounted, or a
        server could not afford to restore it)."""

    def released(self, fh: int) -> None:
        """The handle *fh* is closed."""

    def keep(self, live: Callable[[], Iterable[LogRecord]]) -> None:
        """*live* says which of the records its caller writes are live (those a compaction
        must keep). Each part that writes records names them when it attaches."""


NO_LEDGER = Ledger()
