"""`.metrics`: the counters there from the start at 0, the build info and the process gauges."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import time

import uenvfs
from uenvfs.core.metrics import IMAGE_COUNTERS, Labels, Metrics, gauge, process_gauges, render


def samples(text: bytes) -> dict[str, float]:
    """The samples of a rendering, by name and labels; every family has its HELP and TYPE."""
    found: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.decode().splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        assert key.split("{")[0].removesuffix("_bucket").removesuffix("_sum").removesuffix(
            "_count") in typed, f"{key} without its TYPE"
        found[key] = float(value)
    return found


def test_failure_counters_are_there_at_zero_before_the_first() -> None:
    metrics = Metrics()
    fresh = samples(render(metrics, {}))
    for name in ("uenvfs_journal_errors_total", "uenvfs_refcount_errors_total",
                 "uenvfs_open_files_refused_total", "uenvfs_program_map_refusals_total"):
        assert fresh[name] == 0, name
    metrics.inc("uenvfs_journal_errors_total")
    assert samples(render(metrics, {}))["uenvfs_journal_errors_total"] == 1
    # A gauge of the filesystem's count wins over the 0.
    counted = samples(render(metrics, {"uenvfs_open_files_refused_total": gauge(3)}))
    assert counted["uenvfs_open_files_refused_total"] == 3


def test_counters_by_image_are_zero_for_every_image_known() -> None:
    metrics = Metrics()
    metrics.inc("uenvfs_mount_attempts_total", image="tried")
    metrics.inc("uenvfs_mount_failures_total", image="tried")
    mounted: dict[str, dict[Labels, float]] = {"uenvfs_refcount": {(("image", "adopted"),): 0.0}}
    found = samples(render(metrics, mounted, ["listed"]))
    for name in IMAGE_COUNTERS:
        for image in ("listed", "adopted"):
            assert found[f'{name}{{image="{image}"}}'] == 0, (name, image)
    assert found['uenvfs_mount_attempts_total{image="tried"}'] == 1
    assert found['uenvfs_mount_failures_total{image="tried"}'] == 1
    assert found['uenvfs_unmounts_total{image="tried"}'] == 0
    assert not any('image="other"' in key for key in found)


def test_build_info() -> None:
    text = render(Metrics(), {}).decode()
    assert "# TYPE uenvfs_build_info gauge" in text.splitlines()
    expected = (f'uenvfs_build_info{{version="{uenvfs.__version__}",'
                f'python="{platform.python_version()}",'
                f'pyfuse3="{importlib.metadata.version("pyfuse3")}",'
                f'trio="{importlib.metadata.version("trio")}"}} 1')
    assert expected in text.splitlines()


def test_process_gauges_of_this_process() -> None:
    started = time.time() - 5
    found = samples(render(Metrics(), process_gauges(started)))
    assert found["process_start_time_seconds"] == started
    with open(f"/proc/{os.getpid()}/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    assert abs(found["process_resident_memory_bytes"] - rss_kb * 1024) < 64 * 1024 * 1024
    assert found["process_resident_memory_bytes"] > 1e6
    before = found["process_open_fds"]
    assert before >= 3
    extra = [os.open("/", os.O_RDONLY) for _ in range(5)]
    try:
        assert process_gauges(started)["process_open_fds"][()] == before + 5
    finally:
        for fd in extra:
            os.close(fd)
    assert found["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
