"""The daemon's counters and histograms, and `.metrics` in the Prometheus text format.

The manager and the filesystem count into a `Metrics`; `render` (pure) adds the current state
(gauges) when `.metrics` is opened, so node_exporter's textfile collector or a scrape can read it.
Every failure counter is there from the start, at 0, so that `increase()` sees its first
failure. `process_gauges` reads the serving process' memory and descriptors from /proc, only
when `.metrics` is opened.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import importlib.metadata
import os
import platform
import resource
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HELP = {
    "uenvfs_images": ("gauge", "Images by lifecycle state (unmounted images are not counted)."),
    "uenvfs_images_available": ("gauge", "Images named by the listable image sources."),
    "uenvfs_refcount": ("gauge", "Allocations using each mounted image."),
    "uenvfs_allocations": ("gauge", "Distinct allocations using any image."),
    "uenvfs_open_handles": ("gauge", "Open file and directory handles into images."),
    "uenvfs_known_inodes": ("gauge", "Inodes the kernel holds (the table shrinks on FORGET)."),
    "uenvfs_listing_cache_entries": ("gauge", "Directory entries kept for replay."),
    "uenvfs_listing_cache_bytes": (
        "gauge", "Estimated memory of the listings kept (at most 64 MiB)."),
    "uenvfs_storage_waits_total": (
        "counter", "Calls made in an image's worker threads: listings, and what the caches "
                   "could not answer on guarded storage."),
    "uenvfs_hold_time_seconds": ("gauge", "Global hold time."),
    "uenvfs_emergency": ("gauge", "1 while emergency mode is on."),
    "uenvfs_mount_attempts_total": ("counter", "Mounts started, by image."),
    "uenvfs_mount_failures_total": ("counter", "Mounts that failed, by image."),
    "uenvfs_unmounts_total": ("counter", "Backing mounts unmounted, by image."),
    "uenvfs_refcount_errors_total": ("counter", "RefcountInconsistency bugs caught."),
    "uenvfs_fuse_requests_total": ("counter", "FUSE requests handled, by operation."),
    "uenvfs_fuse_errors_total": ("counter", "FUSE requests answered with an error."),
    "uenvfs_control_commands_total": ("counter", ".control commands, by command and outcome."),
    "uenvfs_queries_total": ("counter", "Requests to the query socket, by op and outcome."),
    "uenvfs_query_refusals_total": (
        "counter", "Connections to the query socket closed unanswered: over the caller's "
                   "share of connections, or too long or too slow a request."),
    "uenvfs_mount_seconds": ("histogram", "Time to mount an image (tool and checks)."),
    "uenvfs_unmount_seconds": ("histogram", "Time to unmount an image."),
    "uenvfs_check_seconds": ("histogram", "Time to validate an image version (rdsquashfs -d)."),
    "uenvfs_journal_errors_total": ("counter", "Journal writes that failed."),
    "uenvfs_open_files_refused_total": (
        "counter", "Opens refused: the allocation held its share of descriptors (EMFILE), "
                   "or the daemon all it may use (ENFILE)."),
    "uenvfs_program_map_refused_total": (
        "counter", "Names not asked of the program map: the user was over its share, by uid "
                   "(a uid shows from its first refusal; alert on "
                   "uenvfs_program_map_refusals_total)."),
    "uenvfs_program_map_refusals_total": (
        "counter", "Names not asked of the program map: the user was over its share (all uids)."),
    "uenvfs_process_scans_total": (
        "counter", "Scans of /proc for processes sitting in images."),
    "uenvfs_process_scan_seconds": ("gauge", "How long the last scan of /proc took."),
    "uenvfs_identity_reads_total": (
        "counter", "Processes whose cgroup and environment were read to find their allocation "
                   "(once per process, not per thread, at most every 50 ms)."),
    "uenvfs_allocation_owners": (
        "gauge", "Allocations in use whose user (uid) the daemon knows."),
    "uenvfs_verify_differences": (
        "gauge", "Differences of the counts from the processes at the last `verify`."),
    "uenvfs_readahead_windows_total": (
        "counter", "Windows of big files read ahead of sequential readers."),
    "uenvfs_build_info": (
        "gauge", "Always 1: the version of uenvfs, and those of Python, pyfuse3 and trio."),
    "process_start_time_seconds": (
        "gauge", "Start time of the serving process since the epoch, in seconds "
                 "(.status: server.started)."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_open_fds": ("gauge", "Number of open file descriptors."),
    "process_max_fds": ("gauge", "Maximum number of open file descriptors (soft limit)."),
}

# Rendered at 0 until counted: the counters without labels, and those by image for every image
# the daemon knows. (By command and outcome, by uid, by operation and errno: the label values
# are not known beforehand; a total without labels stands for the uids.)
ZERO_COUNTERS = (
    "uenvfs_journal_errors_total",
    "uenvfs_refcount_errors_total",
    "uenvfs_open_files_refused_total",
    "uenvfs_program_map_refusals_total",
    "uenvfs_query_refusals_total",
    "uenvfs_storage_waits_total",
    "uenvfs_process_scans_total",
    "uenvfs_readahead_windows_total",
)
IMAGE_COUNTERS = (
    "uenvfs_mount_attempts_total", "uenvfs_mount_failures_total", "uenvfs_unmounts_total")


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value


class Metrics:
    """Counters and histograms, keyed by metric name and labels."""

    def __init__(self, started: float | None = None) -> None:
        self.counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self.histograms: dict[str, Histogram] = defaultdict(Histogram)
        # Per FUSE request: plain dicts keyed by operation, cheaper than labelled counters.
        self.requests: dict[str, int] = defaultdict(int)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)
        # The start of the serving process (unix time) for process_start_time_seconds: the
        # daemon gives that of `.status` (server.started).
        self.started = time.time() if started is None else started

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self.counters[name][tuple(sorted(labels.items()))] += amount

    def observe(self, name: str, value: float) -> None:
        self.histograms[name].observe(value)

    def value(self, name: str, **labels: str) -> float:
        return self.counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@functools.cache
def build_info() -> Labels:
    """The labels of `uenvfs_build_info`: the versions this process runs (looked up once)."""
    from .. import __version__

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return (("version", __version__), ("python", platform.python_version()),
            ("pyfuse3", version("pyfuse3")), ("trio", version("trio")))


def render(metrics: Metrics, gauges: Mapping[str, Mapping[Labels, float]],
           images: Iterable[str] = ()) -> bytes:
    """The Prometheus text exposition of *gauges* (current state) and *metrics*.

    The counters by image are 0 for every image in *images*, in `uenvfs_refcount` (those not
    unmounted) or in any of them, until counted; those without labels (`ZERO_COUNTERS`) are 0
    until counted.
    """
    lines: list[str] = []
    series: dict[str, Mapping[Labels, float]] = {**gauges, **metrics.counters}
    series["uenvfs_fuse_requests_total"] = {
        (("op", op),): n for op, n in metrics.requests.items()}
    series["uenvfs_fuse_errors_total"] = {
        (("errno", code), ("op", op)): n for (op, code), n in metrics.errors.items()}
    series["uenvfs_build_info"] = {build_info(): 1}
    for name in ZERO_COUNTERS:
        if not series.get(name):
            series[name] = {(): 0.0}
    known: set[Labels] = {(("image", name),) for name in images}
    for name in ("uenvfs_refcount", *IMAGE_COUNTERS):
        known.update(series.get(name, {}))
    for name in IMAGE_COUNTERS:
        series[name] = {**dict.fromkeys(known, 0.0), **series.get(name, {})}
    for name in sorted(set(series) | set(metrics.histograms)):
        kind, text = HELP.get(name, ("untyped", name))
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        if name in metrics.histograms:
            hist = metrics.histograms[name]
            cumulative = 0
            for bound, count in zip(hist.buckets, hist.counts, strict=False):
                cumulative += count
                lines.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
            cumulative += hist.counts[-1]
            lines.append(f'{name}_bucket{{le="+Inf"}} {cumulative}')
            lines.append(f"{name}_sum {_number(hist.total)}")
            lines.append(f"{name}_count {cumulative}")
            continue
        for labels, value in sorted(series[name].items()):
            lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return ("\n".join(lines) + "\n").encode()


def gauge(value: float, **labels: str) -> dict[Labels, float]:
    return {tuple(sorted(labels.items())): value}


def state_gauges(status: Mapping[str, Any], available: int, handles: int
                 ) -> dict[str, dict[Labels, float]]:
    """Gauges from a `.status` document."""
    by_state: dict[Labels, float] = {(("state", s),): 0.0
                                     for s in ("mounting", "mounted", "holding", "failed")}
    refcounts: dict[Labels, float] = {}
    allocations: set[str] = set()
    for mount in status["mounts"]:
        by_state[(("state", mount["state"]),)] = by_state.get((("state", mount["state"]),), 0) + 1
        refcounts[(("image", mount["name"]),)] = mount["refcount"]
        allocations.update(mount["allocations"])
    return {
        "uenvfs_images": by_state,
        "uenvfs_images_available": gauge(available),
        "uenvfs_refcount": refcounts,
        "uenvfs_allocations": gauge(len(allocations)),
        "uenvfs_open_handles": gauge(handles),
        "uenvfs_hold_time_seconds": gauge(status["hold_time"]),
        "uenvfs_emergency": gauge(1 if status["emergency"] else 0),
    }


def process_gauges(started: float) -> dict[str, dict[Labels, float]]:
    """The standard process_* gauges of this process: *started* (unix time), its resident
    memory and its descriptors, from /proc (Linux); what cannot be read is left out."""
    gauges = {"process_start_time_seconds": gauge(started)}
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_bytes().split()[1])  # resident, in pages
        gauges["process_resident_memory_bytes"] = gauge(pages * resource.getpagesize())
    with contextlib.suppress(OSError):
        gauges["process_open_fds"] = gauge(len(os.listdir("/proc/self/fd")))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        gauges["process_max_fds"] = gauge(soft)
    return gauges
