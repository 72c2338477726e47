"""What one user makes the daemon keep is bounded and counted against that user, through the
real mount, the attacker being `nobody` (issue 27): handles of every kind, the ledger's
allocations, the renders of `.status`, and the memory of a server restoring handles. Each test
failed before its fix."""

from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from uenvfs.core import ledger_layout
from uenvfs.core.ledger import ALLOC
from uenvfs.core.numbers import IDLE
from uenvfs.core.shared_ledger import SharedLedger
from uenvfs.fuse.snapshots import MIN_GAP

from ..cgroups import MemoryGroup
from ..conftest import DaemonFactory
from ..support import Daemon, metric, wait_until

pytestmark = pytest.mark.fuse

NOBODY = 65534
DAEMON_UID = 1  # another user: `daemon`
PYTHON = "/usr/bin/python3"  # the system's: every user may run it

# Opens argv[1] up to argv[2] times and keeps them all open until stdin closes: prints how many
# it holds and the errno that stopped it (0: none).
HOLD = r"""
import os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
path, count = sys.argv[1], int(sys.argv[2])
fds, error = [], 0
for _ in range(count):
    try:
        fds.append(os.open(path, os.O_RDONLY))
    except OSError as exc:
        error = exc.errno
        break
print(len(fds), error, flush=True)
sys.stdin.read()
"""

# Reads argv[1] to its end again and again until stdin closes; then prints how many times.
READ_LOOP = r"""
import os, sys, threading
path, reads, stop = sys.argv[1], [0], threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("reading", flush=True)
while not stop.is_set():
    with open(path, "rb") as f:
        while f.read(1 << 16):
            pass
    reads[0] += 1
print(reads[0], flush=True)
"""

# Opens and reads argv[1] argv[2] times, each from a new thread under a new allocation name: the
# last 8 characters of PACT_ALLOCATION_ID are written over in the process's own environment
# (what /proc/PID/environ shows) before each thread starts. Prints how many opens failed.
NAMES = r"""
import ctypes, os, sys, threading
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_void_p
value = libc.getenv(b"PACT_ALLOCATION_ID")
length = len(os.environ["PACT_ALLOCATION_ID"])
failed = [0]
def once():
    try:
        with open(sys.argv[1], "rb") as f:
            f.read(1)
    except OSError:
        failed[0] += 1
for i in range(int(sys.argv[2])):
    ctypes.memmove(value + length - 8, b"%08x" % i, 8)
    thread = threading.Thread(target=once)
    thread.start()
    thread.join()
print(failed[0], flush=True)
"""

# A job of another allocation (root): holds argv[1] open with its working directory in the
# image; on each line of stdin it reads the file again from the start and lists its directory.
VICTIM = r"""
import json, os, sys
os.chdir(os.path.dirname(sys.argv[1]))
f = open(os.path.basename(sys.argv[1]), "rb")
print("ready", flush=True)
for line in sys.stdin:
    try:
        f.seek(0)
        print(json.dumps([f.read().decode(), sorted(os.listdir("."))]), flush=True)
    except OSError as exc:
        print(json.dumps(["error", exc.errno]), flush=True)
"""


def as_user(uid: int, code: str, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.Popen[str]:
    """The system's Python running *code* as *uid* (its own group, no other), stdin and
    stdout piped."""
    command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
               PYTHON, "-I", "-c", code, *args]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", **(env or {})}, cwd="/")


def answer(proc: subprocess.Popen[str], timeout: float = 60.0) -> list[str]:
    """The words of the next line *proc* prints (fails the test if none in *timeout* s)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no answer within {timeout:g} s"
    line = proc.stdout.readline()
    assert line, f"exited {proc.wait()} without an answer"
    return line.split()


def hold(uid: int, path: Path, count: int, env: dict[str, str] | None = None
         ) -> tuple[subprocess.Popen[str], int, int]:
    """A process of *uid* holding up to *count* opens of *path*: it, how many it got, and
    the errno that stopped it (0: none)."""
    proc = as_user(uid, HOLD, str(path), str(count), env=env)
    held, error = map(int, answer(proc, 60 + count / 200))
    return proc, held, error


def stop(procs: Sequence[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextmanager
def stopped(procs: list[subprocess.Popen[str]]) -> Iterator[list[subprocess.Popen[str]]]:
    try:
        yield procs
    finally:
        stop(procs)


def rss(pid: int) -> int:
    """The resident memory of *pid*, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def acquire_many(daemon: Daemon, image: str, count: int) -> None:
    """Root acquires *image* for *count* allocations with long names (128 characters): a
    `.status` of about 200 bytes each."""
    padding = "x" * (128 - len("fill-000000-"))
    lines = [f"acquire {image} fill-{i:06d}-{padding}\n".encode() for i in range(count)]
    fd = os.open(daemon.mountpoint / ".control", os.O_WRONLY)
    try:
        batch = b""
        for line in lines:
            if len(batch) + len(line) > 3900:
                os.write(fd, batch)
                batch = b""
            batch += line
        os.write(fd, batch)
    finally:
        os.close(fd)


def victim(daemon: Daemon, path: Path) -> subprocess.Popen[str]:
    """Another job (root, allocation victim-job) holding *path* open, sitting in its
    directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("PACT_ALLOCATION_ID",
                                                             "SLURM_JOB_ID")}
    proc = subprocess.Popen([PYTHON, "-I", "-c", VICTIM, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**env, "PACT_ALLOCATION_ID": "victim-job"})
    assert answer(proc) == ["ready"]
    return proc


def victim_sees(proc: subprocess.Popen[str], timeout: float = 30.0) -> list[object]:
    """What the victim reads of its file and its directory now."""
    assert proc.stdin is not None
    proc.stdin.write("again\n")
    proc.stdin.flush()
    found: list[object] = json.loads(" ".join(answer(proc, timeout)))
    return found


# -- snapshots and handles without descriptors --------------------------------------------


def test_status_handles_share_one_snapshot_and_a_user_past_its_share_gets_emfile(
    daemon: Daemon,
) -> None:
    daemon.image("img", {"f": "x"})
    daemon.config = "handles_per_uid = 400\n"
    daemon.expect(r"uid 65534 holds 400 handles .* over its share of handles \(400\); open "
                  r"refused")
    daemon.start()
    acquire_many(daemon, "img", 500)
    size = len((daemon.mountpoint / ".status").read_bytes())
    assert size > 100_000
    server = daemon.server_pid()
    before = rss(server)
    with stopped([]) as procs:
        proc, held, error = hold(NOBODY, daemon.mountpoint / ".status", 1000)
        procs.append(proc)
        assert (held, error) == (400, errno.EMFILE)
        per_handle = (rss(server) - before) / held
        assert per_handle < 4096, f"{per_handle:.0f} bytes per handle (.status: {size})"
        # Root still opens it, and so would any other user.
        document = json.loads((daemon.mountpoint / ".status").read_bytes())
        assert len(document["mounts"][0]["allocations"]) == 500
        proc, other, error = hold(DAEMON_UID, daemon.mountpoint / ".status", 10)
        procs.append(proc)
        assert (other, error) == (10, 0)
    assert metric(daemon, "uenvfs_open_handles_refused_total") >= 1
    daemon.control("reconcile --none")


def test_root_handles_share_one_listing_and_a_user_past_its_share_gets_emfile(
    daemon: Daemon,
) -> None:
    image = daemon.image("attack", {"f": "x"})
    for n in range(1000):  # 1,001 names in the root
        (daemon.images / f"filler-{n:04d}.sqfs").symlink_to(image)
    daemon.config = "handles_per_uid = 300\n"
    daemon.expect(r"uid 65534 holds 300 handles .* over its share of handles \(300\); open "
                  r"refused")
    daemon.start()
    names = len(os.listdir(daemon.mountpoint))
    assert names == 1001 + 4  # and .control, .status, .metrics, .socket
    server = daemon.server_pid()
    before = rss(server)
    with stopped([]) as procs:
        proc, held, error = hold(NOBODY, daemon.mountpoint, 1000)
        procs.append(proc)
        assert (held, error) == (300, errno.EMFILE)
        per_handle = (rss(server) - before) / held
        assert per_handle < 4096, f"{per_handle:.0f} bytes per handle"
        names = len(os.listdir(daemon.mountpoint))
    assert names == 1001 + 4  # and .control, .status, .metrics, .socket  # root lists on
    # Released (the kernel sends the releases a little after the process exits): given back.
    wait_until(lambda: metric(daemon, "uenvfs_handles_without_descriptor") <= 1,
               what="nobody's handles to be given back")


# -- the ledger ---------------------------------------------------------------------------


def ledger_numbers(daemon: Daemon) -> set[int]:
    """The allocation numbers the server's ledger has records of in its active log."""
    pid = daemon.server_pid()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
        if link.startswith("/memfd:uenvfs-ledger"):
            copy = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
            book = SharedLedger(copy)
            try:
                head = ledger_layout.header(book.map)
                return {number for kind, _, number, _
                        in ledger_layout.records(book.map, head.active, head.used[head.active])
                        if kind == ALLOC}
            finally:
                book.close()
                os.close(copy)
    raise AssertionError("the server has no ledger")


def test_made_up_names_do_not_fill_the_ledger_and_cost_another_job_nothing(
    daemon: Daemon,
) -> None:
    """Only root's processes name any allocation they like (nobody's environment names only
    its own allocations): 20,000 names from one process of root's stand for the allocations a
    node sees in turn, or a process of root's that renames itself."""
    daemon.image("attack", {"file.txt": "x"})
    daemon.image("victim", {"dir/f": "victim's", "dir/g": ""})
    daemon.expect(r"server pid \d+ was killed by SIGKILL")
    daemon.start()
    job = victim(daemon, daemon.mountpoint / "victim/dir/f")
    with stopped([job]):
        names = as_user(0, NAMES, str(daemon.mountpoint / "attack/file.txt"), "20000",
                        env={"PACT_ALLOCATION_ID": "made-up-00000000"})
        with stopped([names]):
            assert answer(names, 240) == ["0"]  # every open worked
        # The allocations of the ledger are those in use (the job's), and at most IDLE
        # unused ones kept named (core/numbers.py): not 20,000.
        assert len(ledger_numbers(daemon)) <= IDLE + 8
        assert metric(daemon, "uenvfs_ledger_allocations") <= 2
        daemon.kill_server()
        assert victim_sees(job) == ["victim's", ["f", "g"]]
        assert daemon.cli("restart").returncode == 0
        assert victim_sees(job) == ["victim's", ["f", "g"]]
        uses = daemon.mount_status("victim")["allocations"]["victim-job"]  # type: ignore[index]
        assert (uses["opens"], uses["cwd"]) == (1, 1)


# -- descriptors --------------------------------------------------------------------------


def test_three_allocations_of_one_user_cannot_take_every_descriptor(daemon: Daemon) -> None:
    daemon.image("attack", {"file.txt": "x"})
    daemon.image("victim", {"f": "victim's"})
    daemon.nofile = 1024  # 768 for open files: a share of 384 per uid
    daemon.config = "open_files_per_allocation = 300\n"
    daemon.expect(r"made-up-0 holds 300 open files in images: over its share \(300\)")
    daemon.expect(r"uid 65534 \(made-up-\d\) holds 384 open files in images: over the share "
                  r"of a uid \(384\); open refused")
    daemon.start()
    for k in range(3):  # three allocations of nobody's (as the prolog of its jobs would say)
        daemon.control(f"acquire attack made-up-{k} {NOBODY}")
    with stopped([]) as procs:
        held = []
        for k in range(3):
            proc, count, error = hold(NOBODY, daemon.mountpoint / "attack/file.txt", 1000,
                                      env={"PACT_ALLOCATION_ID": f"made-up-{k}"})
            procs.append(proc)
            held.append((count, error))
        assert held == [(300, errno.EMFILE), (84, errno.EMFILE), (0, errno.EMFILE)]
        # Root and another user still open files (each with the room the others left).
        assert (daemon.mountpoint / "victim/f").read_text() == "victim's"
        proc, count, error = hold(DAEMON_UID, daemon.mountpoint / "victim/f", 50)
        procs.append(proc)
        assert (count, error) == (50, 0)
    daemon.control("reconcile --none")


# -- rendering .status --------------------------------------------------------------------


def test_a_status_reader_in_a_loop_costs_a_bounded_number_of_renders(daemon: Daemon) -> None:
    daemon.image("img", {"f": "x"})
    daemon.image("victim", {"f": "victim's"})
    daemon.start()
    acquire_many(daemon, "img", 2000)  # a .status of about 400 KB
    renders = metric(daemon, "uenvfs_status_renders_total")
    readers = [as_user(NOBODY, READ_LOOP, str(daemon.mountpoint / ".status"))
               for _ in range(2)]
    with stopped(readers):
        for reader in readers:
            assert answer(reader) == ["reading"]
        # Another job opens and reads a file again and again: each open and close changes
        # what .status shows.
        began = time.monotonic()
        opens = 0
        while time.monotonic() - began < 3.0:
            assert (daemon.mountpoint / "victim/f").read_text() == "victim's"
            opens += 1
        seconds = time.monotonic() - began
        for reader in readers:
            assert reader.stdin is not None
            reader.stdin.close()
        reads = sum(int(answer(reader)[0]) for reader in readers)
    made = metric(daemon, "uenvfs_status_renders_total") - renders
    # At most one render per MIN_GAP (and fewer: each takes a share of the time at most),
    # shared by the readers waiting; not one per read, nor one per change.
    assert 0 < made <= seconds / MIN_GAP + 4
    assert made < opens
    assert reads >= made - 2
    daemon.control("reconcile --none")


# -- a server killed for its memory ---------------------------------------------------------


@pytest.fixture
def memory_group() -> Iterator[MemoryGroup]:
    group = MemoryGroup.create(f"uenvfs-test-{os.getpid()}", 1 << 32)
    if group is None:
        pytest.skip("no memory cgroup of ours to make one in")
    yield group
    group.remove()


def test_a_server_killed_by_the_oom_killer_while_restoring_does_not_crash_loop(
    memory_group: MemoryGroup, make_daemon: DaemonFactory,
) -> None:
    # (The cgroup is made first, so removed last: after the daemon in it stopped.)
    daemon = make_daemon(hold_time=600.0, cgroup=memory_group.path)
    daemon.image("attack", {"dir/f": "x"})
    daemon.image("victim", {"dir/f": "victim's", "dir/g": ""})
    daemon.config = "handles_per_uid = 200000\nhandles_total = 400000\n"
    for line in (r"server pid \d+ was killed by SIGKILL",
                 r"server pid \d+ was killed by the OOM killer",
                 r"servers in a row died before serving",
                 r"the last server was killed by the OOM killer.*: so as not to die the same "
                 r"way, \d+ handles answer EIO from now on, not restored: "):
        daemon.expect(line)
    daemon.start()
    job = victim(daemon, daemon.mountpoint / "victim/dir/f")
    with stopped([job]) as procs:
        for _ in range(6):  # directory handles of nobody, more than one process may hold
            proc, held, error = hold(NOBODY, daemon.mountpoint / "attack/dir", 18000)
            procs.append(proc)
            assert (held, error) == (18000, 0)
        # Room for the server as it is, not for one restoring all of that again.
        memory_group.limit(memory_group.usage() + (12 << 20))
        daemon.kill_server()
        # A server restoring everything is killed (each time, before: no job got an answer
        # again); the next ones spare what they cannot afford and serve.
        wait_until(lambda: (memory_group.oom_kills() or 0) >= 1, timeout=60,
                   what="the OOM killer")
        assert victim_sees(job, timeout=60) == ["victim's", ["f", "g"]]
        assert "handles answer EIO from now on, not restored: 108000 of uid 65534\n" in (
            daemon.log())
        assert (daemon.mountpoint / "victim/dir/g").read_text() == ""
        memory_group.limit(1 << 32)
