"""pid → allocation id: cgroup first, then environment, then uid; cached for a moment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uenvfs.fuse.allocation import (
    RECHECK_AFTER,
    AllocationResolver,
    from_cgroup,
    from_environ,
    parse_environ,
)

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
        ("garbage without colons", None),
    ],
)
def test_from_cgroup(text: str, alloc: str | None) -> None:
    assert from_cgroup(text) == alloc


@pytest.mark.parametrize(
    ("env", "alloc"),
    [
        ({b"PACT_ALLOCATION_ID": b"alloc-9", b"SLURM_JOB_ID": b"5"}, "alloc-9"),
        ({b"SLURM_JOB_ID": b"5"}, "slurm-5"),
        ({b"SLURM_JOB_ID": b"5x"}, None),
        ({b"PACT_ALLOCATION_ID": b"has space"}, None),
        ({b"PACT_ALLOCATION_ID": b""}, None),
        ({}, None),
    ],
)
def test_from_environ(env: dict[bytes, bytes], alloc: str | None) -> None:
    assert from_environ(env) == alloc


def test_parse_environ() -> None:
    assert parse_environ(b"A=1\0B=x=y\0junk\0\0") == {b"A": b"1", b"B": b"x=y"}


def fake_proc(root: Path, pid: int, cgroup: str, environ: bytes = b"", tgid: int | None = None
              ) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    (d / "status").write_text(f"Name:\tx\nTgid:\t{tgid or pid}\nPid:\t{pid}\n")
    (d / "environ").write_bytes(environ)


def test_resolver_order_on_a_fake_proc(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, PACT_V2, b"PACT_ALLOCATION_ID=other\0")
    fake_proc(tmp_path, 11, PLAIN, b"SLURM_JOB_ID=99\0")
    fake_proc(tmp_path, 12, PLAIN, b"HOME=/\0")
    fake_proc(tmp_path, 20, PLAIN, b"", tgid=21)  # a thread: environment of its process
    fake_proc(tmp_path, 21, PLAIN, b"PACT_ALLOCATION_ID=threads\0")
    resolver = AllocationResolver(tmp_path)
    assert resolver.resolve(10, 1000) == "alloc-42"
    assert resolver.resolve(11, 1000) == "slurm-99"
    assert resolver.resolve(12, 1000) == "uid-1000"
    assert resolver.resolve(20, 5) == "threads"
    assert resolver.resolve(404, 7) == "uid-7"  # gone: falls back, never raises


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
