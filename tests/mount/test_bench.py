"""scripts/bench end to end in its smoke mode: it completes, reports every workload for the
three mounts and for jobs started with `uenvfs run`, and leaves no mount or loop device behind.
No timing is asserted: benchmarks report ratios, tests check behaviour."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..mounts import clean_up, loops_for, mounts_under

REPO = Path(__file__).resolve().parents[2]
SYSTEMS = ("kernel", "squashfuse_ll", "uenvfs")
TIMED_ROWS = (
    "find/warm", "find/cold", "stat/warm", "stat/cold", "read-all/warm", "read-all/cold",
    "import/warm", "import/cold", "seq-random/warm", "seq-random/cold", "seq-text/warm",
    "seq-text/cold", "concurrent/warm", "concurrent/cold", "trigger/warm", "trigger/cold",
    "storm/warm",
)
# Daemon memory: the kernel mount has no daemon, so it has no number there.
RSS_ROWS = ("rss/idle", "rss/walk", "rss/after-drop")
# Jobs started with `uenvfs run`, against the kernel mount, with the server's CPU meanwhile.
RUN_ROWS = (
    "run/find/warm", "run/find/cold", "run/stat/warm", "run/stat/cold", "run/read-all/warm",
    "run/read-all/cold", "run/import/warm", "run/import/cold", "run/storm/warm",
)
RUN_SYSTEMS = ("kernel", "run")
# The server's CPU per 10,000 file accesses: through its FUSE mount, and in a job.
CPU_ROW = "cpu/10k-accesses"
CPU_SYSTEMS = ("uenvfs", "run")
MACHINE_KEYS = ("nproc", "kernel", "cpu", "python", "pyfuse3")


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def median_of(result: dict[str, Any], system: str) -> object:
    summary = result[system]
    return summary["median"] if isinstance(summary, dict) else summary


def run_bench(command: list[str], timeout: float = 240) -> tuple[int, str, str]:
    """Run a benchmark; if it hangs, SIGTERM lets it take its mounts down before it dies."""
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            stdout, stderr = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"{shlex.join(command)} did not finish in {timeout:g} s:\n{stdout}\n{stderr}")
    return process.returncode, stdout, stderr


@pytest.mark.fuse
def test_quick_bench_reports_every_workload_and_leaves_nothing_mounted(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    out = tmp_path / "b.json"
    command = [str(REPO / "scripts" / "bench"), "--quick", "--workdir", str(workdir),
               "--json", str(out)]
    try:
        returncode, stdout, stderr = run_bench(command)
        mounted = [entry.mount_point for entry in mounts_under(workdir)]
        loops = loops_for(workdir)
    finally:
        clean_up(workdir)  # whatever happened, no mount may outlive the test

    assert returncode == 0, f"scripts/bench failed:\n{stdout}\n{stderr}"
    assert mounted == []
    assert loops == []

    document = json.loads(out.read_text())
    results = document["results"]
    assert set(results) == set(TIMED_ROWS) | set(RSS_ROWS) | set(RUN_ROWS) | {CPU_ROW}
    for row in TIMED_ROWS:
        medians = {system: median_of(results[row], system) for system in SYSTEMS}
        assert all(is_number(m) for m in medians.values()), (row, medians)
    for row in RSS_ROWS:
        assert results[row]["kernel"] is None
        medians = {system: median_of(results[row], system) for system in SYSTEMS[1:]}
        assert all(is_number(m) for m in medians.values()), (row, medians)
    check_job_rows(results)
    for key in MACHINE_KEYS:
        assert document["machine"][key], key
    assert document["problems"] == []
    for row in (*TIMED_ROWS, *RSS_ROWS, *RUN_ROWS, CPU_ROW):
        assert row in stdout  # the table has a line for every workload


def check_job_rows(results: dict[str, Any]) -> None:
    """The rows of jobs started with `uenvfs run`: a time on the kernel mount and in the job,
    a ratio, and the server's CPU seconds in every run of each; the server's CPU per 10,000
    accesses through FUSE and in a job (the figures themselves are the benchmark's to report)."""
    for row in RUN_ROWS:
        result = results[row]
        medians = {system: median_of(result, system) for system in RUN_SYSTEMS}
        assert all(is_number(m) for m in medians.values()), (row, medians)
        assert is_number(result["ratio"]["run"]), row
        # What the jobs measured: the image's own kernel mount, not uenvfs's directory.
        assert result["mounted"]["run"] == "squashfs on uenvfs's backing mount", row
        for system in RUN_SYSTEMS:
            cpu = result["server_cpu_s"][system]
            assert cpu, (row, system)
            assert all(is_number(c) for c in cpu), (row, system, cpu)
    result = results[CPU_ROW]
    medians = {system: median_of(result, system) for system in CPU_SYSTEMS}
    assert all(is_number(m) for m in medians.values()), medians


@pytest.mark.fuse
def test_quick_attachcost_reports_every_count_and_leaves_nothing_mounted(tmp_path: Path) -> None:
    """scripts/attachcost.py --quick: 1 and 4 tasks attach at once, each checked (the image's
    own mount in every task, one loop device and one mount on the node), and it tears down."""
    workdir = tmp_path / "work"
    out = tmp_path / "a.json"
    command = [sys.executable, str(REPO / "scripts" / "attachcost.py"), "--quick",
               "--workdir", str(workdir), "--json", str(out)]
    try:
        returncode, stdout, stderr = run_bench(command)
        mounted = [entry.mount_point for entry in mounts_under(workdir)]
        loops = loops_for(workdir)
    finally:
        clean_up(workdir)

    assert returncode == 0, f"scripts/attachcost.py failed:\n{stdout}\n{stderr}"
    assert mounted == []
    assert loops == []
    document = json.loads(out.read_text())
    assert document["problems"] == []
    assert [s["tasks"] for s in document["summary"]] == [1, 4]
    for summary in document["summary"]:
        for key in ("wall_median_s", "per_task_median_s", "per_task_max_s",
                    "server_cpu_per_task_s"):
            assert is_number(summary[key]), (summary["tasks"], key)
        assert summary["rounds"] == 1
    assert document["summary"][0]["uenv_plugin_s"] == 0.07  # printed beside ours
    assert [len(r["per_task_s"]) for r in document["rounds"]] == [1, 4]
    assert "uenv plugin" in stdout
