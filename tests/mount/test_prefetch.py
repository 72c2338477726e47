"""A big file read through the real mount is read ahead of, and correct."""

from __future__ import annotations

import hashlib
import random
import subprocess

import pytest

from ..support import Daemon, metric, wait_until

MIB = 1 << 20


@pytest.mark.fuse
def test_a_big_file_read_through_the_mount_is_read_ahead_and_correct(daemon: Daemon) -> None:
    data = random.Random(7).randbytes(40 * MIB)
    daemon.hold_time = 0.2
    daemon.image("big", {"blob": data, "small": "x"})
    daemon.start()
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    out = subprocess.run(["sha256sum", str(daemon.mountpoint / "big" / "blob")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert metric(daemon, "uenvfs_readahead_windows_total") >= 2
    # Small files are never read ahead; the image unmounts normally once idle (the thread
    # holds no file of it open).
    (daemon.mountpoint / "big" / "small").read_text()
    wait_until(lambda: not daemon.backing_mounted("big"), what="the hold-time unmount")
    assert "still busy" not in daemon.log()
