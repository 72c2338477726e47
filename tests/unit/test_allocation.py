"""pid → allocation id: a cgroup at a configured layout, then the environment as far as the
caller's uid may name it, then the uid; read once per process, cached for a moment; and the
owner map that says which allocation is whose."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from uenvfs.core.cgroups import DEFAULT_LAYOUTS, allocation, parse_layouts
from uenvfs.core.owners import SLACK, Owners
from uenvfs.fuse.allocation import (
    ENVIRON_MAX,
    RECHECK_AFTER,
    AllocationResolver,
    from_environ,
    variable,
)

LAYOUTS = parse_layouts(DEFAULT_LAYOUTS)
PACT_V2 = "0::/workload.slice/alloc-42.scope\n"
SLURM_V2 = "0::/system.slice/slurmstepd.scope/job_1234/step_0/user/task_0\n"
SLURM_V1 = """12:pids:/slurm/uid_1000/job_77/step_batch
4:memory:/slurm/uid_1000/job_77/step_batch/task_0
1:name=systemd:/system.slice/slurmd.service
0::/
"""
PLAIN = "0::/user.slice/user-1000.slice/session-3.scope\n"
HYBRID_PACT = """9:name=systemd:/
4:memory:/process_api/f39cd874
0::/workload.slice/job-abc_1.scope
"""
# What a user can make in a cgroup subtree delegated to it (systemd's user@.service, or any
# directory chowned to it): names that look like an allocation's, below a place of its own.
DELEGATED = "0::/user.slice/user-1000.slice/user@1000.service/app.slice"
NOBODY = 65534


@pytest.mark.parametrize(
    ("text", "alloc"),
    [
        (PACT_V2, "alloc-42"),
        (SLURM_V2, "slurm-1234"),
        (SLURM_V1, "slurm-77"),
        (HYBRID_PACT, "job-abc_1"),
        (PLAIN, None),
        ("", None),
        ("0::/workload.slice\n", None),
        ("0::/workload.slice/not-a-scope\n", None),
        ("0::/workload.slice/bad id.scope\n", None),
        ("0::/workload.slice/.scope\n", None),
        ("garbage without colons", None),
        # Only where the resource manager puts them, from the root of the hierarchy on:
        (f"{DELEGATED}/job_77\n", None),
        (f"{DELEGATED}/workload.slice/x.scope\n", None),
        ("0::/system.slice/job_77\n", None),
        ("0::/job_77\n", None),
        ("0::/tmp/system.slice/slurmstepd.scope/job_5\n", None),
        ("0::/../workload.slice/x.scope\n", None),  # outside the reader's cgroup namespace
        ("0::/system.slice/slurmstepd.scope/job_5x\n", None),
        ("0::/slurm/uid_x/job_5\n", None),
        # Deeper levels below the match belong to the same allocation:
        ("0::/workload.slice/alloc-1.scope/sub/job_99\n", "alloc-1"),
        ("0::/system.slice/slurmstepd.scope/job_5/step_0/user/job_6\n", "slurm-5"),
    ],
)
def test_a_cgroup_names_an_allocation_only_at_a_layout(text: str, alloc: str | None) -> None:
    assert allocation(text, LAYOUTS) == alloc


def test_layouts_are_configurable_and_tried_in_order() -> None:
    layouts = parse_layouts(["/site.slice/alloc_{id}", "/batch/u{uid}/{job}.job"])
    assert allocation("0::/site.slice/alloc_a1/x\n", layouts) == "a1"
    assert allocation("0::/batch/u7/123.job\n", layouts) == "slurm-123"
    assert allocation(PACT_V2, layouts) is None  # not configured: not trusted
    assert allocation(PACT_V2, ()) is None


def environ(**variables: str) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in variables.items())


@pytest.mark.parametrize(
    ("block", "alloc"),
    [
        (environ(PACT_ALLOCATION_ID="alloc-9", SLURM_JOB_ID="5"), "alloc-9"),
        (environ(SLURM_JOB_ID="5"), "slurm-5"),
        (environ(HOME="/", SLURM_JOB_ID=" 5 "), "slurm-5"),
        (environ(SLURM_JOB_ID="5x"), None),
        (environ(PACT_ALLOCATION_ID="has space"), None),
        (environ(PACT_ALLOCATION_ID="", SLURM_JOB_ID="6"), "slurm-6"),
        (environ(XPACT_ALLOCATION_ID="no", MY_SLURM_JOB_ID="7"), None),
        (b"", None),
    ],
)
def test_from_environ(block: bytes, alloc: str | None) -> None:
    assert from_environ(block) == alloc


def test_variable_is_found_as_getenv_finds_it() -> None:
    block = b"A=1\0B=x=y\0junk\0\0A=2\0"
    assert variable(block, b"A") == b"1"  # the first, as getenv
    assert variable(block, b"B") == b"x=y"
    assert variable(block, b"C") is None
    assert variable(b"A=1\0B=cut off", b"B") is None  # no end: a bounded read cut it


def fake_proc(root: Path, pid: int, cgroup: str, environ: bytes = b"", tgid: int | None = None,
              uid: int | None = None) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    uids = "" if uid is None else f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
    (d / "status").write_text(f"Name:\tx\nTgid:\t{tgid or pid}\nPid:\t{pid}\n{uids}")
    (d / "environ").write_bytes(environ)


def test_resolver_order_on_a_fake_proc(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, PACT_V2, b"PACT_ALLOCATION_ID=other\0")
    fake_proc(tmp_path, 11, PLAIN, b"SLURM_JOB_ID=99\0")
    fake_proc(tmp_path, 12, PLAIN, b"HOME=/\0")
    fake_proc(tmp_path, 20, PLAIN, b"", tgid=21)  # a thread: environment of its process
    fake_proc(tmp_path, 21, PLAIN, b"PACT_ALLOCATION_ID=threads\0")
    resolver = AllocationResolver(tmp_path)
    assert resolver.resolve(10, 1000) == "alloc-42"  # a cgroup at a layout: any uid
    assert resolver.resolve(11, 0) == "slurm-99"  # root's environment, as it is
    assert resolver.resolve(12, 1000) == "uid-1000"
    assert resolver.resolve(20, 0) == "threads"
    assert resolver.resolve(404, 7) == "uid-7"  # gone: falls back, never raises


def test_another_uid_names_only_its_own_allocations_in_its_environment(tmp_path: Path) -> None:
    owners = Owners(lambda: {"mine", "slurm-5", "job-a"})
    resolver = AllocationResolver(tmp_path, owners=owners)
    fake_proc(tmp_path, 30, PLAIN, environ(PACT_ALLOCATION_ID="mine"), uid=NOBODY)
    fake_proc(tmp_path, 31, PLAIN, environ(SLURM_JOB_ID="5"), uid=NOBODY)
    fake_proc(tmp_path, 32, PLAIN, environ(PACT_ALLOCATION_ID="victim"), uid=NOBODY)
    assert resolver.resolve(30, NOBODY) == "uid-65534"  # unknown: nobody's own
    assert resolver.resolve(31, NOBODY) == "uid-65534"
    owners.learn("mine", NOBODY, "acquire")
    owners.learn("slurm-5", 1000, "acquire")
    assert resolver.resolve(30, NOBODY) == "mine"  # decided anew: at once, from the cache
    assert resolver.resolve(31, NOBODY) == "uid-65534"  # slurm-5 is uid 1000's
    assert resolver.resolve(32, NOBODY) == "uid-65534"

    # A process of uid 1000 in the cgroup of job-a teaches that job-a is uid 1000's; then
    # another process of that uid, outside the cgroup, may name it; one of uid 2000 may not.
    # Root in a cgroup teaches nothing.
    fake_proc(tmp_path, 40, "0::/workload.slice/job-a.scope\n", uid=1000)
    fake_proc(tmp_path, 41, PLAIN, environ(PACT_ALLOCATION_ID="job-a"), uid=1000)
    fake_proc(tmp_path, 42, PLAIN, environ(PACT_ALLOCATION_ID="job-a"), uid=2000)
    fake_proc(tmp_path, 43, "0::/workload.slice/job-b.scope\n", uid=0)
    assert resolver.resolve(41, 1000) == "uid-1000"
    assert resolver.resolve(40, 1000) == "job-a"
    assert owners.owner("job-a") == 1000
    time.sleep(RECHECK_AFTER)
    assert resolver.resolve(41, 1000) == "job-a"
    assert resolver.resolve(42, 2000) == "uid-2000"
    assert resolver.resolve(43, 0) == "job-b"
    assert owners.owner("job-b") is None


def test_the_uid_is_the_real_one_of_the_process(tmp_path: Path) -> None:
    """A set-user-ID root program started by nobody (FUSE says uid 0) runs with nobody's
    environment; a process that made itself non-dumpable has a /proc/<pid> owned by root (a
    scan's uid 0). Either is nobody's."""
    (tmp_path / "50").mkdir()
    (tmp_path / "50/cgroup").write_text(PLAIN)
    (tmp_path / "50/status").write_text(f"Name:\tsu\nTgid:\t50\nUid:\t{NOBODY}\t0\t0\t0\n")
    (tmp_path / "50/environ").write_bytes(environ(PACT_ALLOCATION_ID="victim"))
    resolver = AllocationResolver(tmp_path)
    assert resolver.resolve(50, 0) == "uid-65534"
    assert resolver.judge(resolver.read(50, 0)) == "uid-65534"


def test_a_variable_past_the_bound_is_not_seen(tmp_path: Path) -> None:
    padding = b"P=" + b"x" * (ENVIRON_MAX - 43) + b"\0"
    late = environ(PACT_ALLOCATION_ID="late-one")  # 28 bytes: it ends at ENVIRON_MAX
    fake_proc(tmp_path, 60, PLAIN, environ(PACT_ALLOCATION_ID="early") + padding)
    fake_proc(tmp_path, 61, PLAIN, padding + b"Q=123456789\0" + late)
    fake_proc(tmp_path, 62, PLAIN, padding + b"Q=1234567890\0" + late)
    fake_proc(tmp_path, 63, PLAIN, padding * 40 + environ(PACT_ALLOCATION_ID="far"))
    resolver = AllocationResolver(tmp_path)
    assert len(padding + b"Q=123456789\0" + late) == ENVIRON_MAX
    assert resolver.resolve(60, 0) == "early"
    assert resolver.resolve(61, 0) == "late-one"  # its NUL is the last byte read
    assert resolver.resolve(62, 0) == "uid-0"  # cut off by the bound
    assert resolver.resolve(63, 0) == "uid-0"


def test_the_threads_of_a_process_cost_one_reading(tmp_path: Path) -> None:
    fake_proc(tmp_path, 100, PLAIN, environ(PACT_ALLOCATION_ID="many"))
    for tid in range(101, 401):
        fake_proc(tmp_path, tid, PLAIN, b"", tgid=100)
    resolver = AllocationResolver(tmp_path)
    started = time.monotonic()
    assert {resolver.resolve(tid, 0) for tid in range(100, 401)} == {"many"}
    # Once per RECHECK_AFTER at most (on a busy machine 301 threads may take longer).
    assert resolver.lookups <= 1 + (time.monotonic() - started) / RECHECK_AFTER < 301 / 4


def test_a_real_process_with_threads_is_read_once() -> None:
    resolver = AllocationResolver()
    code = ("import sys, threading\n"
            "go = threading.Event()\n"
            "def wait(): go.wait()\n"
            "threads = [threading.Thread(target=wait) for _ in range(50)]\n"
            "for t in threads: t.start()\n"
            "print(*(t.native_id for t in threads), flush=True)\n"
            "sys.stdin.read(); go.set()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PACT_ALLOCATION_ID": "threaded"})
    try:
        assert child.stdout is not None
        tids = [int(t) for t in child.stdout.readline().split()]
        assert len(tids) == 50
        started = time.monotonic()
        assert {resolver.resolve(tid, 0) for tid in [child.pid, *tids]} == {"threaded"}
        assert resolver.lookups <= 1 + (time.monotonic() - started) / RECHECK_AFTER < 51
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def _child(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A child that runs (its execve is over, its environment readable) until stdin closes."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **env})
    assert child.stdout is not None
    child.stdout.readline()
    child.stdout.close()
    return child


def test_cache_hit_reads_no_proc_and_an_exited_pid_is_read_again() -> None:
    resolver = AllocationResolver()
    child = _child({"PACT_ALLOCATION_ID": "first"})
    try:
        assert resolver.resolve(child.pid, 0) == "first"
        lookups = resolver.lookups
        for _ in range(100):
            assert resolver.resolve(child.pid, 0) == "first"
        assert resolver.lookups == lookups  # served from the cache
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    # Once the short trust window is over (a pid cannot be reused that fast), /proc is read
    # again: the process is gone.
    time.sleep(RECHECK_AFTER)
    assert resolver.resolve(child.pid, 0) == "uid-0"
    assert resolver.lookups == lookups + 1


def test_a_changed_allocation_counts_once_the_window_is_over(tmp_path: Path) -> None:
    """`exec env PACT_ALLOCATION_ID=after ...` or a move to another cgroup, in a fake /proc."""
    proc = tmp_path / "proc"
    (proc / "30").mkdir(parents=True)
    (proc / "30/cgroup").write_text("0::/user.slice/session-1.scope\n")
    (proc / "30/status").write_text("Name:\tsh\nTgid:\t30\n")
    (proc / "30/environ").write_bytes(b"PACT_ALLOCATION_ID=before\0")
    resolver = AllocationResolver(proc)
    assert resolver.resolve(30, 0) == "before"
    (proc / "30/environ").write_bytes(b"PACT_ALLOCATION_ID=after\0")  # the exec
    time.sleep(RECHECK_AFTER)
    assert resolver.resolve(30, 0) == "after"
    (proc / "30/cgroup").write_text("0::/workload.slice/late.scope\n")  # moved
    time.sleep(RECHECK_AFTER)
    assert resolver.resolve(30, 0) == "late"


def test_many_threads_cost_no_descriptor_and_the_cache_stays_bounded(tmp_path: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    resolver = AllocationResolver(tmp_path / "proc", max_entries=100)
    for pid in range(10_000):
        resolver.resolve(pid, 0)
    assert len(resolver) == 100
    assert len(os.listdir("/proc/self/fd")) == fds
    for pid in range(1, 1000):  # threads of process 5000
        fake_proc(tmp_path / "proc", 5000 + pid, PLAIN, tgid=5000)
    for pid in range(1, 1000):
        resolver.resolve(5000 + pid, 0)
    assert len(resolver) <= 200


def test_the_owner_map_holds_allocations_in_use_only() -> None:
    in_use = {"live-1", "live-2"}
    owners = Owners(lambda: in_use)
    owners.learn("live-1", 1000, "acquire")
    owners.learn("live-2", 1001, "acquire")
    # Sightings of allocations that never use an image (made-up ones cannot be sighted, but
    # real jobs come and go): pruned whenever the map doubled.
    for n in range(10_000):
        owners.learn(f"passing-{n}", 2000, "a process in its cgroup")
        assert len(owners) <= SLACK + 1
    assert owners.owner("passing-9999") == 2000  # the last one is kept: its use may follow
    assert (owners.owner("live-1"), owners.owner("live-2")) == (1000, 1001)
    owners.prune()
    assert len(owners) == 2
    # The latest word wins (a resource manager that gave the id to another user's job).
    owners.learn("live-1", 3000, "acquire")
    assert owners.owner("live-1") == 3000
    owners.forget("live-1")
    assert owners.owner("live-1") is None
    # Many allocations in use: the map holds them all, and no more than twice that.
    in_use = {f"job-{n}" for n in range(1000)}
    for n in range(1000):
        owners.learn(f"job-{n}", n + 1, "acquire")
    for n in range(5000):
        owners.learn(f"passing-{n}", 2000, "a process in its cgroup")
    assert len(owners) <= 2 * 1002 + 1
    assert all(owners.owner(f"job-{n}") == n + 1 for n in range(1000))


def test_the_resolver_may_be_used_from_a_worker_thread_for_reads(tmp_path: Path) -> None:
    """`read` (a scan's worker thread) changes nothing; `judge` (the loop) learns."""
    owners = Owners(lambda: {"job-t"})
    resolver = AllocationResolver(tmp_path, owners=owners)
    fake_proc(tmp_path, 70, "0::/workload.slice/job-t.scope\n", uid=1234)
    found = []
    worker = threading.Thread(target=lambda: found.append(resolver.read(70, 0)))
    worker.start()
    worker.join()
    assert (len(resolver), resolver.lookups, owners.owner("job-t")) == (0, 0, None)
    assert resolver.judge(found[0]) == "job-t"
    assert (resolver.lookups, owners.owner("job-t")) == (1, 1234)
