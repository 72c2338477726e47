"""The inodes the kernel knows, by number: the root and its control files, image directories,
and the nodes inside images. How the numbers are made (image versions and their prefixes):
core/model.py. A number the table does not know answers ESTALE, which makes the kernel look the
path up again."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyfuse3
from pyfuse3 import InodeT

from ..core.ledger import (
    NO_LEDGER,
    Contents,
    Ledger,
    LogRecord,
    image_dir_record,
    node_record,
)
from ..core.model import PREFIX_SHIFT, InodePrefixes, Mount

ROOT = pyfuse3.ROOT_INODE
RESTORED = 1 << 62  # the lookups of a node restored from the ledger: never forgotten
CONTROL, STATUS, METRICS = InodeT(2), InodeT(3), InodeT(4)
SOCKET = InodeT(5)  # `.socket`, a symlink: no file requests, only attributes and readlink
INO_MASK = (1 << PREFIX_SHIFT) - 1

@dataclass(eq=False)
class Node:
    """An inode the kernel knows inside an image. `rel` is its path in the image.

    Every component of `rel` but the last is a directory (lookups only happen in directory
    nodes), so resolving it never follows a symlink of the image.
    """

    ino: int
    image: str
    prefix: int  # of the image version it belongs to; 0 for the image directory itself
    rel: bytes
    is_dir: bool = True
    lookups: int = 0

    def child(self, name: bytes) -> bytes:
        return self.rel + b"/" + name if self.rel else name


def child_ino(prefix: int, st: os.stat_result) -> int:
    """The inode number of a file of the image version *prefix*, from its backing `stat`."""
    if st.st_ino > INO_MASK:
        raise pyfuse3.FUSEError(errno.EOVERFLOW)
    return prefix << PREFIX_SHIFT | st.st_ino


def backing_path(node: Node, mount: Mount) -> tuple[Mount, bytes]:
    """*mount* and the path of *node* in it; ESTALE if *node* is of another image version."""
    if node.prefix and node.prefix != mount.version.prefix:
        # The image file was replaced since the kernel saw it.
        raise pyfuse3.FUSEError(errno.ESTALE)
    return mount, mount.root + b"/" + node.rel if node.rel else mount.root


class InodeTable(dict[int, Node]):
    """The inodes inside images that the kernel knows, by number.

    Invariants: a file's node stays while the kernel holds a lookup of it (`lookups` > 0) and
    goes with its last FORGET; an image directory's node stays for the daemon's life, with the
    same number. `table[ino]` of an unknown number raises ESTALE (the kernel's answer for an
    inode that is gone).
    """

    def __init__(self, prefixes: InodePrefixes) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.image_inos: dict[str, int] = {}
        self.ledger: Ledger = NO_LEDGER  # where new nodes are written for the next server

    def __missing__(self, ino: int) -> Node:
        raise pyfuse3.FUSEError(errno.ESTALE)

    def attach(self, ledger: Ledger) -> None:
        """Write new nodes to *ledger* from now on (and the image directories known now); the
        nodes and directories known are what its compactions keep."""
        self.ledger = ledger
        ledger.keep(self.records)
        for name, ino in self.image_inos.items():
            ledger.image_dir(ino >> PREFIX_SHIFT, name)

    def image_ino(self, name: str) -> int:
        """The inode number of image *name*'s directory (made on first use)."""
        ino = self.image_inos.get(name)
        if ino is None:
            prefix = self.prefixes.new()
            self.ledger.image_dir(prefix, name)
            ino = self.image_inos[name] = prefix << PREFIX_SHIFT
            self[ino] = Node(ino, name, 0, b"")
        return ino

    def add_lookup(self, ino: int, parent: Node, prefix: int, name: bytes, mode: int) -> None:
        """The kernel now knows *ino* once more (a lookup, or an entry of readdirplus)."""
        node = self.get(ino)
        if node is None:
            node = self[ino] = Node(ino, parent.image, prefix, parent.child(name),
                                    stat.S_ISDIR(mode))
            self.ledger.node(ino, node.rel, node.is_dir)
        node.lookups += 1

    def records(self) -> Iterator[LogRecord]:
        """The ledger's records of every node and image directory the kernel may ask about."""
        for name, ino in self.image_inos.items():
            yield image_dir_record(ino >> PREFIX_SHIFT, name)
        for node in self.values():
            if node.prefix:
                yield node_record(node.ino, node.rel, node.is_dir)

    def restore(self, contents: Contents) -> None:
        """The nodes a server before this one gave the kernel (see core/ledger.py). Their
        lookup counts are not known: they stay for this server's life."""
        for name, prefix in contents.image_dirs.items():
            ino = self.image_inos[name] = prefix << PREFIX_SHIFT
            self[ino] = Node(ino, name, 0, b"")
        for ino, (rel, is_dir) in contents.nodes.items():
            version = contents.versions.get(ino >> PREFIX_SHIFT)
            if version is not None:
                self[ino] = Node(ino, version[0], ino >> PREFIX_SHIFT, rel, is_dir, RESTORED)

    def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        """The kernel's FORGET: it dropped *count* lookups of each inode."""
        for ino, count in inode_list:
            node = self.get(ino)
            if node is None or not node.prefix:
                continue  # the root, control files and image directories live forever
            node.lookups -= count
            if node.lookups <= 0:
                del self[ino]
