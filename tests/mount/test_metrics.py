"""`.metrics` of a daemon just started: the failure counters at 0, the versions, the process."""

from __future__ import annotations

import json
import re
import time

import pytest

import uenvfs

from ..support import Daemon

pytestmark = pytest.mark.fuse


def read_samples(daemon: Daemon) -> dict[str, float]:
    samples = {}
    for line in (daemon.mountpoint / ".metrics").read_text().splitlines():
        if not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def test_fresh_daemon_has_its_failure_counters_at_zero_and_its_process(daemon: Daemon) -> None:
    daemon.image("img", {"a": "A"})
    daemon.start()
    samples = read_samples(daemon)
    now = time.time()
    for name in ("uenvfs_journal_errors_total", "uenvfs_refcount_errors_total",
                 "uenvfs_open_files_refused_total", "uenvfs_program_map_refusals_total"):
        assert samples[name] == 0, name
    for name in ("uenvfs_mount_attempts_total", "uenvfs_mount_failures_total",
                 "uenvfs_unmounts_total"):
        assert samples[f'{name}{{image="img"}}'] == 0, name
    info = [key for key in samples if key.startswith("uenvfs_build_info{")]
    assert len(info) == 1
    assert re.fullmatch(r'uenvfs_build_info\{version="([^"]+)",python="[^"]+",pyfuse3="[^"]+",'
                        r'trio="[^"]+"\}', info[0])
    assert f'version="{uenvfs.__version__}"' in info[0]
    assert samples[info[0]] == 1
    assert samples["process_open_fds"] > 0
    assert samples["process_max_fds"] >= samples["process_open_fds"]
    assert samples["process_resident_memory_bytes"] > 1e6
    started = samples["process_start_time_seconds"]
    assert now - 60 < started <= now
    server = json.loads((daemon.mountpoint / ".status").read_text())["server"]
    assert started == pytest.approx(server["started"], abs=0.001)

    # The first mount of the image counts from the 0 seen above.
    assert (daemon.mountpoint / "img/a").read_text() == "A"
    assert read_samples(daemon)['uenvfs_mount_attempts_total{image="img"}'] == 1
