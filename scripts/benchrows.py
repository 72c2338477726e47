"""scripts/bench.py's results: a Row per line of its table, how the rows are summarised for the
JSON and printed, and BenchError, which stops the benchmark.

Two tables: the three mounts (the kernel's squashfs, squashfuse_ll and uenvfs's FUSE mount)
per workload, and the jobs started with `uenvfs run` against the kernel mount
(scripts/runrows.py), with the uenvfs server's CPU time. Every ratio is a median over the
kernel's median in the same run: absolute times on a shared machine are noisy.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

SYSTEMS = ("kernel", "squashfuse_ll", "uenvfs")  # the mounts of the first table
RUN_SYSTEMS = ("kernel", "run")  # the kernel mount, and the same image in a `uenvfs run` job
CPU_SYSTEMS = ("uenvfs", "run")  # where the server's CPU per access is measured


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def note(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One line of a table: the runs on each of *systems* (absent: not applicable), the
    uenvfs server's CPU seconds in each of those runs where they were read, and what was
    mounted where a system's workload ran, where that was looked at. Ratios are to the
    "kernel" system, where the row has it."""

    key: str
    unit: str
    runs: dict[str, list[float]]
    systems: tuple[str, ...] = SYSTEMS
    server_cpu: dict[str, list[float]] = field(default_factory=dict)
    mounted: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"unit": self.unit}
        for system in self.systems:
            values = self.runs.get(system)
            doc[system] = None if not values else {
                "median": statistics.median(values), "min": min(values), "max": max(values),
                "runs": values}
        doc["ratio"] = {system: self.ratio(system) for system in self.systems[1:]}
        if self.server_cpu:
            doc["server_cpu_s"] = self.server_cpu
        if self.mounted:
            doc["mounted"] = self.mounted
        return doc

    def median(self, system: str) -> float | None:
        values = self.runs.get(system)
        return statistics.median(values) if values else None

    def ratio(self, system: str) -> float | None:
        base, value = self.median("kernel"), self.median(system)
        if base is None or value is None or base <= 0:
            return None
        return value / base


def check_same(label: str, outputs: dict[str, str]) -> None:
    """The workload's output (a count of files, say) must not depend on the mount."""
    if len(set(outputs.values())) > 1:
        raise BenchError(f"{label} gives different results on the mounts: {outputs}")


def scale(row: Row) -> tuple[float, str]:
    if row.unit != "s":
        return 1.0, row.unit
    medians = [m for m in (row.median(s) for s in row.systems) if m is not None]
    return (1.0, "s") if medians and max(medians) >= 10 else (1000.0, "ms")


def cell(row: Row, system: str, factor: float) -> str:
    values = row.runs.get(system)
    if not values:
        return "n/a"
    median = statistics.median(values) * factor
    low, high = min(values) * factor, max(values) * factor
    return f"{median:.1f} [{low:.1f}-{high:.1f}]" if len(values) > 1 else f"{median:.1f}"


def ratio_text(row: Row, system: str) -> str:
    ratio = row.ratio(system)
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def table(rows: list[Row], info: dict[str, Any]) -> str:
    m = info["machine"]
    settings = info["settings"]
    images = "; ".join(f"{name} {d['files']} files, {d['mib']:.0f} MiB"
                       for name, d in info["images"].items())
    lines = [
        f"uenvfs benchmark: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, "
        f"Python {m['python']}, pyfuse3 {m['pyfuse3']}, libfuse {m['libfuse']}, "
        f"squashfuse {m['squashfuse']}, mksquashfs {m['mksquashfs']}",
        f"uenvfs {m['uenvfs_commit']} (backend {settings['uenvfs_backend']}); images: {images}",
        f"median [min-max] of {settings['warm_runs']} warm / {settings['cold_runs']} cold runs; "
        "ratio = median / kernel median",
        "",
    ]
    mounts = [row for row in rows if row.systems == SYSTEMS]
    header = (f"{'workload':<20}{'unit':<5}{'kernel':>24}{'squashfuse_ll':>24}{'uenvfs':>24}"
              f"{'sqfuse/k':>10}{'uenvfs/k':>10}")
    if mounts:
        lines += [header, "-" * len(header)]
    for row in mounts:
        factor, unit = scale(row)
        lines.append(f"{row.key:<20}{unit:<5}"
                     + "".join(f"{cell(row, s, factor):>24}" for s in SYSTEMS)
                     + "".join(f"{ratio_text(row, s):>10}" for s in SYSTEMS[1:]))
    jobs = [row for row in rows if row.systems != SYSTEMS]
    if jobs:
        lines += [""] * bool(mounts) + run_table(jobs)
    return "\n".join(lines)


def run_table(rows: list[Row]) -> list[str]:
    """The jobs started with `uenvfs run`, each timed inside the job against the kernel mount
    timed the same way, with the server's CPU seconds during the job's runs; then the server's
    CPU per 10,000 file accesses on both paths."""
    lines = ["jobs started with `uenvfs run IMAGE:MOUNT`, timed inside the job (what was at "
             "MOUNT: the last line); server CPU = the uenvfs server's user+system seconds during "
             "all of the job's timed runs"]
    header = (f"{'workload':<20}{'unit':<5}{'kernel':>24}{'uenvfs run':>24}{'run/k':>10}"
              f"{'server CPU':>12}")
    lines += [header, "-" * len(header)]
    for row in rows:
        factor, unit = scale(row)
        if row.systems == RUN_SYSTEMS:
            cpu = sum(row.server_cpu.get("run", []))
            lines.append(f"{row.key:<20}{unit:<5}"
                         + "".join(f"{cell(row, s, factor):>24}" for s in RUN_SYSTEMS)
                         + f"{ratio_text(row, 'run'):>10}{cpu:>11.2f}s")
        else:
            lines.append(f"{row.key:<20}{unit:<5}"
                         + ", ".join(f"through {'uenvfs (FUSE)' if s == 'uenvfs' else 'uenvfs run'}"
                                     f" {cell(row, s, factor)}" for s in row.systems))
    found = sorted({row.mounted["run"] for row in rows if "run" in row.mounted})
    if found:
        lines.append(f"at the jobs' mount point: {'; '.join(found)}")
    return lines


def progress(row: Row) -> None:
    factor, unit = scale(row)
    parts = ", ".join(f"{s} {cell(row, s, factor)}" for s in row.systems)
    note(f"{row.key} ({unit}): {parts}")
