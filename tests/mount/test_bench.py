"""scripts/bench end to end in its smoke mode: it completes, reports every workload for the
three mounts, and leaves no mount or loop device behind. No timing is asserted: benchmarks
report ratios, tests check behaviour."""

from __future__ import annotations

import json
import math
import subprocess
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
MACHINE_KEYS = ("nproc", "kernel", "cpu", "python", "pyfuse3")


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def median_of(result: dict[str, Any], system: str) -> object:
    summary = result[system]
    return summary["median"] if isinstance(summary, dict) else summary


def run_bench(command: list[str], timeout: float = 240) -> tuple[int, str, str]:
    """Run the benchmark; if it hangs, SIGTERM lets it take its mounts down before it dies."""
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
        pytest.fail(f"scripts/bench did not finish in {timeout:g} s:\n{stdout}\n{stderr}")
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
    assert set(results) == set(TIMED_ROWS) | set(RSS_ROWS)
    for row in TIMED_ROWS:
        medians = {system: median_of(results[row], system) for system in SYSTEMS}
        assert all(is_number(m) for m in medians.values()), (row, medians)
    for row in RSS_ROWS:
        assert results[row]["kernel"] is None
        medians = {system: median_of(results[row], system) for system in SYSTEMS[1:]}
        assert all(is_number(m) for m in medians.values()), (row, medians)
    for key in MACHINE_KEYS:
        assert document["machine"][key], key
    assert document["problems"] == []
    for row in (*TIMED_ROWS, *RSS_ROWS):
        assert row in stdout  # the table has a line for every workload
