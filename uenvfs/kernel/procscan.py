"""What the processes of the node hold in a FUSE filesystem, from /proc alone.

FUSE sees opens, not uses: a process whose working directory is inside an image holds no
handle, and a file description passed to another process or inherited by a child is counted
for whoever opened it. The kernel knows every use; `scan` asks it, for every process and
thread of every mount namespace (a bind mount of the filesystem has the same device):

  - `cwd`, `root`: `/proc/<pid>/task/<tid>/cwd` and `root` (threads may differ: `unshare`);
  - `fd`: `/proc/<pid>/fd/<n>` (one entry per descriptor; `descriptions` tells which share
    one open file description, after a fork or an SCM_RIGHTS pass, with `kcmp(2)`);
  - `map`: `/proc/<pid>/maps` (a mapping keeps its file open after the descriptor is closed);
  - `exe`: `/proc/<pid>/exe` (a running program).

Each link is looked at with `statx(2)` and `AT_STATX_DONT_SYNC`: the kernel answers with the
device and inode number it holds, without asking the filesystem. So this never sends a request
to the FUSE daemon, and the daemon may scan its own mount (in a worker thread, still: /proc of
thousands of processes takes milliseconds).

A mount namespace can hold a mount of an image with no process using it: a bind of a backing
mount (or a tree handed out and attached there) keeps its superblock alive. `namespaces_holding`
finds those: the processes grouped by mount namespace (the inode number of
`/proc/<pid>/ns/mnt`, looked at, never opened), and the mount table of each namespace other than
this process's read once (`/proc/<one of its pids>/mountinfo`).

Blocking, and without state but whether kcmp is there: for worker threads and the CLI.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from . import libc, mountinfo

AT_STATX_DONT_SYNC = 0x4000
STATX_INO = 0x100
STATX_SIZE = 256
KCMP_FILE = 0

CWD_KINDS = ("cwd", "root")
ALL_KINDS = ("cwd", "root", "fd", "map", "exe")

log = logging.getLogger(__name__)

# Set once kcmp turned out not to be there (ENOSYS: an architecture whose number uenvfs does
# not know, or a kernel without CONFIG_KCMP): from then on it is not called again.
_no_kcmp = False


@dataclass(frozen=True, slots=True)
class Hold:
    """One use of an inode of the filesystem by one process (thread *tid* for cwd/root)."""

    pid: int
    tid: int
    uid: int
    kind: str  # one of ALL_KINDS
    ino: int
    fd: int = -1  # the descriptor, for kind "fd"


@dataclass(frozen=True, slots=True)
class Namespace:
    """A mount namespace other than this process's, with mounts of some of the devices asked
    for: its inode number, its processes (as found, in order: any may have gone since), the
    devices."""

    ino: int
    pids: tuple[int, ...]
    devices: frozenset[int]


def identity(path: bytes, buf: ctypes.Array[ctypes.c_char] | None = None
             ) -> tuple[int, int] | None:
    """(device, inode) of what *path* leads to, as the kernel holds it (never asking the
    filesystem); None if it cannot be looked at (the process is gone, or not ours to see).
    *buf*: a `statx` buffer to reuse (`ctypes.create_string_buffer(STATX_SIZE)`)."""
    if buf is None:
        buf = ctypes.create_string_buffer(STATX_SIZE)
    try:
        libc.statx(path, AT_STATX_DONT_SYNC, STATX_INO, buf)
    except OSError:
        return None
    ino, = struct.unpack_from("=Q", buf, 32)
    major, minor = struct.unpack_from("=II", buf, 136)
    return os.makedev(major, minor), ino


def _numbers(path: bytes) -> list[int]:
    try:
        return [int(n) for n in os.listdir(path) if n.isdigit()]
    except OSError:
        return []


def _uid(base: bytes) -> int:
    try:
        return os.stat(base).st_uid
    except OSError:
        return -1


def scan(dev: int, kinds: Iterable[str] = ALL_KINDS, proc: bytes = b"/proc") -> list[Hold]:
    """Every use of the filesystem of device *dev* of the given *kinds*, by every process
    (uid -1: the process went away meanwhile)."""
    want = frozenset(kinds)
    links = [k for k in ("cwd", "root") if k in want]
    dev_text = b"%02x:%02x" % (os.major(dev), os.minor(dev))
    buf = ctypes.create_string_buffer(STATX_SIZE)
    found: list[Hold] = []
    for pid in _numbers(proc):
        found.extend(_holds(proc, pid, want, links, dev, dev_text, buf))
    return found


def holds_of(pid: int, dev: int, proc: bytes = b"/proc") -> list[Hold]:
    """What process *pid* holds of the filesystem of device *dev* (fds, maps, program)."""
    dev_text = b"%02x:%02x" % (os.major(dev), os.minor(dev))
    return _holds(proc, pid, frozenset(("fd", "map", "exe")), [], dev, dev_text,
                  ctypes.create_string_buffer(STATX_SIZE))


def _holds(proc: bytes, pid: int, want: frozenset[str], links: Sequence[str], dev: int,
           dev_text: bytes, buf: ctypes.Array[ctypes.c_char]) -> list[Hold]:
    base = b"%s/%d" % (proc, pid)
    mine: list[tuple[int, str, int, int]] = []  # tid, kind, ino, fd
    if links:
        # The threads of a process share its working directory and root, unless one of
        # them unshared them (CLONE_FS): look at every thread only when there are several.
        tids = [pid]
        try:
            if os.stat(base + b"/task").st_nlink > 3:
                tids = _numbers(base + b"/task")
        except OSError:
            return []
        for tid in tids:
            task = base if tid == pid else b"%s/task/%d" % (base, tid)
            for kind in links:
                held = identity(b"%s/%s" % (task, kind.encode()), buf)
                if held is not None and held[0] == dev:
                    mine.append((tid, kind, held[1], -1))
    if "fd" in want:
        for fd in _numbers(base + b"/fd"):
            held = identity(b"%s/fd/%d" % (base, fd), buf)
            if held is not None and held[0] == dev:
                mine.append((pid, "fd", held[1], fd))
    if "map" in want:
        mine.extend((pid, "map", ino, -1) for ino in _mapped(base, dev_text))
    if "exe" in want:
        held = identity(base + b"/exe", buf)
        if held is not None and held[0] == dev:
            mine.append((pid, "exe", held[1], -1))
    if not mine:
        return []
    uid = _uid(base)
    return [Hold(pid, tid, uid, kind, ino, fd) for tid, kind, ino, fd in mine]


def opens_of(holds: Iterable[Hold], ino: int) -> int:
    """How many open file descriptions of *ino* the holds of one process are: its
    descriptors of it (one per description), else 1 if it maps it or runs it."""
    fds = [h for h in holds if h.kind == "fd" and h.ino == ino]
    if fds:
        return len(descriptions(fds))
    return int(any(h.ino == ino for h in holds))


def _mapped(base: bytes, dev_text: bytes) -> set[int]:
    """The inodes of device *dev_text* (as maps writes it, hex major:minor) mapped by a
    process."""
    inodes: set[int] = set()
    try:
        with open(base + b"/maps", "rb") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) > 4 and fields[3] == dev_text:
                    inodes.add(int(fields[4]))
    except (OSError, ValueError):
        pass
    return inodes


def same_description(a: Hold, b: Hold) -> bool:
    """Whether two descriptors are one open file description (`kcmp(2)`, KCMP_FILE). When
    that cannot be told (no kcmp here, or it fails: the process is gone, or not ours to
    compare), two descriptors are two descriptions."""
    global _no_kcmp
    if a.pid == b.pid and a.fd == b.fd:
        return True
    if _no_kcmp:
        return False
    try:
        return libc.kcmp(a.pid, b.pid, KCMP_FILE, a.fd, b.fd) == 0
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            _no_kcmp = True
            log.warning("%s: every descriptor counts as an open file description of its own "
                        "(a resumed server keeps every pending handle that one may stand "
                        "for)", exc.strerror)
        return False


def descriptions(holds: Iterable[Hold]) -> list[list[Hold]]:
    """The `fd` holds grouped by open file description: each group is one open of the
    filesystem, shared by fork, dup or SCM_RIGHTS.

    Where kcmp cannot tell (see `same_description`; without it at all, the log says so once),
    the count is conservative: descriptors stay in groups of their own, so there are as many
    groups as there can be opens, never fewer. A resumed server (server/resume.py `settle`)
    keeps a pending handle only while its opener holds more opens than confirmed handles:
    counting too many keeps a handle that may be stale (a use counted too long), counting too
    few would drop one the kernel still uses (its process's reads would fail). So a pending
    handle is never dropped that kcmp could have shown to be held."""
    groups: list[list[Hold]] = []
    by_ino: dict[int, list[list[Hold]]] = {}
    for hold in holds:
        if hold.kind != "fd":
            continue
        candidates = by_ino.setdefault(hold.ino, [])
        for group in candidates:
            if same_description(group[0], hold):
                group.append(hold)
                break
        else:
            group = [hold]
            candidates.append(group)
            groups.append(group)
    return groups


def mount_namespace(base: bytes) -> int | None:
    """The inode number of the mount namespace of the process at *base* (`/proc/<pid>`),
    as its `ns/mnt` link reads (`mnt:[4026531841]`: half the cost of a stat of it, and no
    descriptor); None if it is gone or not ours to see."""
    try:
        return int(os.readlink(base + b"/ns/mnt")[5:-1])
    except (OSError, ValueError):
        return None


def by_namespace(proc: bytes = b"/proc") -> dict[int, list[int]]:
    """The processes of every mount namespace, by its inode number (a process's namespace is
    its main thread's)."""
    spaces: dict[int, list[int]] = {}
    for pid in _numbers(proc):
        ino = mount_namespace(b"%s/%d" % (proc, pid))
        if ino is not None:
            spaces.setdefault(ino, []).append(pid)
    return spaces


def namespaces_holding(devices: Mapping[int, str], proc: bytes = b"/proc") -> list[Namespace]:
    """The mount namespaces other than this process's in which a device of *devices* (st_dev
    -> the mount point of our own mount of it) is mounted anywhere but at that mount point.

    There sits the copy of our mount that every namespace made since inherits: it is nobody's
    use (it goes with our own unmount where the propagation of mounts reaches it). A bind of it
    elsewhere, or a tree attached elsewhere, is. The mount table of each namespace is read once,
    through its first process still there (and still in it); mount points are as that
    process sees them, from its root."""
    if not devices:
        return []
    own = mount_namespace(b"%s/self" % proc)
    found = []
    for ino, pids in by_namespace(proc).items():
        if ino == own:
            continue
        for pid in pids:
            base = b"%s/%d" % (proc, pid)
            try:
                entries = mountinfo.mounts_of(devices.keys(), base + b"/mountinfo")
            except OSError:
                continue
            if mount_namespace(base) == ino:  # not a new process with an old one's pid
                break
        else:
            continue  # every process of it is gone
        held = frozenset(e.device for e in entries if e.mount_point != devices[e.device])
        if held:
            found.append(Namespace(ino, tuple(sorted(pids)), held))
    return found
