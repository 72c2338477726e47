"""Image sources as autofs has them: directories, map files, a program map; reload."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest

from ..support import Daemon, build_image, errno_of, release_holder, spawn_holder, wait_until


@pytest.mark.fuse
def test_map_files_and_program_map_through_the_mount(daemon: Daemon) -> None:
    store = daemon.root / "store"
    build_image(store / "alpha.sqfs", {"f": "alpha"})
    build_image(store / "beta.sqfs", {"f": "beta"})
    build_image(store / "gamma.sqfs", {"f": "gamma"})
    map1, map2 = daemon.root / "one.map", daemon.root / "two.map"
    map1.write_text(f"alpha {store}/alpha.sqfs\n")
    map2.write_text(f"# second map\nb {store}/beta.sqfs\n")
    program = daemon.root / "lookup"
    program.write_text(
        "#!/bin/sh\n"
        f'case "$1" in gamma) echo {store}/gamma.sqfs;; slow) sleep 30;; '
        "broken) echo not-a-path;; *) exit 1;; esac\n")
    program.chmod(0o755)
    daemon.extra_args = ["--map", str(map1), "--map", str(map2),
                         "--program-map", str(program)]
    daemon.config = "program_timeout = 1.0\n"
    daemon.expect("program map .* slow: no answer after 1.0 s")
    daemon.expect("program map .* broken: expected one absolute path")
    daemon.start()
    mnt = daemon.mountpoint
    assert sorted(os.listdir(mnt)) == [".control", ".metrics", ".socket", ".status", "alpha", "b"]
    assert (mnt / "alpha/f").read_text() == "alpha"
    assert (mnt / "b/f").read_text() == "beta"
    assert (mnt / "gamma/f").read_text() == "gamma"  # a program map name: not listable
    assert "gamma" not in os.listdir(mnt)
    assert errno_of(lambda: os.stat(mnt / "nothing")) == errno.ENOENT
    assert errno_of(lambda: os.stat(mnt / "broken")) == errno.ENOENT
    started = time.monotonic()
    assert errno_of(lambda: os.stat(mnt / "slow")) == errno.ENOENT  # after the timeout
    assert time.monotonic() - started < 10
    m = daemon.mount_status("gamma")
    assert m is not None
    assert m["image_path"] == str(store / "gamma.sqfs")


@pytest.mark.fuse
def test_slow_program_map_does_not_block_the_images(daemon: Daemon) -> None:
    daemon.image("fast", {"f": "fast", "g": "g"})
    program = daemon.root / "lookup"
    program.write_text("#!/bin/sh\necho asked >> \"$0.log\"; sleep 30\n")
    program.chmod(0o755)
    daemon.extra_args = ["--program-map", str(program)]
    daemon.config = "program_timeout = 3.0\n"
    daemon.expect("no answer after 3.0 s")
    daemon.start()
    assert (daemon.mountpoint / "fast/f").read_text() == "fast"
    # Inside the image, from a descriptor of its directory: no lookup in the root, which the
    # kernel may make again (and wait behind the slow one) once its entry of `fast` expired.
    fast = os.open(daemon.mountpoint / "fast", os.O_RDONLY | os.O_DIRECTORY)
    slow = subprocess.Popen(["stat", str(daemon.mountpoint / "slow")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        fd = os.open("g", os.O_RDONLY, dir_fd=fast)
        try:
            assert os.read(fd, 100) == b"g"  # inside an image: not blocked
        finally:
            os.close(fd)
        # The slow lookup holds on for 2.5 s more: reading g did not wait for it.
        assert time.monotonic() - started < 2
    finally:
        os.close(fast)
        assert slow.wait(20) != 0
    # The "no" is remembered: asking again does not run the program again at once.
    assert errno_of(lambda: os.stat(daemon.mountpoint / "slow")) == errno.ENOENT
    assert (daemon.root / "lookup.log").read_text() == "asked\n"


@pytest.mark.fuse
def test_reload_adds_and_removes_names_in_use_stay_served(daemon: Daemon) -> None:
    map_file = daemon.root / "site.map"
    store = daemon.root / "store"
    build_image(store / "kept.sqfs", {"f": "kept"})
    build_image(store / "gone.sqfs", {"f": "gone"})
    map_file.write_text(f"kept {store}/kept.sqfs\ngone {store}/gone.sqfs\n")
    daemon.extra_args = ["--map", str(map_file)]
    daemon.start()
    assert daemon.process is not None
    holder = spawn_holder(daemon.mountpoint / "gone/f", alloc="job-1")
    build_image(store / "new.sqfs", {"f": "new"})
    map_file.write_text(f"kept {store}/kept.sqfs\nnew {store}/new.sqfs\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "new" in os.listdir(daemon.mountpoint), what="SIGHUP to reload")
    assert "gone" not in os.listdir(daemon.mountpoint)
    assert (daemon.mountpoint / "gone/f").read_text() == "gone"  # still in use: still served
    release_holder(holder)
    daemon.wait_idle("gone")
    daemon.control("expire")
    # The kernel is told to forget the name (asynchronously, by pyfuse3's notify thread).
    wait_until(lambda: not os.path.exists(daemon.mountpoint / "gone"),
               what="the removed name to be forgotten")
    assert errno_of(lambda: os.stat(daemon.mountpoint / "gone")) == errno.ENOENT
    assert (daemon.mountpoint / "new/f").read_text() == "new"
