"""Faults found by a hostile review, through the real mount: each test failed before its fix."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import DaemonFactory
from ..mounts import is_mounted
from ..support import (
    Daemon,
    build_from_pack,
    build_image,
    errno_of,
    metric,
    release_holder,
    spawn_holder,
    wait_until,
)

pytestmark = pytest.mark.fuse


def restart(make_daemon: DaemonFactory, old: Daemon) -> Daemon:
    """A new daemon on the directories of *old*, which was killed."""
    new = make_daemon(root=old.root, hold_time=old.hold_time)
    new.expected = old.expected
    old.allow_leftovers = True  # its mounts are handed over, on purpose
    return new.start()


def answered(command: list[str], within: float = 5.0) -> str:
    """The output of *command*, which must finish well within *within* s: a daemon that hangs
    fails the test instead of hanging it."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=within,
                              check=True).stdout
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command)}: no answer within {within} s")


def test_adoption_never_pairs_a_mount_with_a_replaced_image_file(
    make_daemon: DaemonFactory,
) -> None:
    old_f, new_f = "old content\n" * 10, "new and longer content\n" * 200
    first = make_daemon(hold_time=300.0)
    first.image("img", {"f": old_f, "old-only": "old"})
    first.expect("clearing a FUSE mount left at")
    first.start()
    assert (first.mountpoint / "img/f").read_text() == old_f
    first.kill()
    # The journal lost the mount's entry (torn, or killed before the background write).
    (first.state_dir / "journal.json").unlink(missing_ok=True)
    os.replace(build_image(first.root / "new.sqfs", {"f": new_f, "new-only": "new"}),
               first.images / "img.sqfs")

    second = restart(make_daemon, first)
    img = second.mountpoint / "img"
    # The adopted mount is the old image: it is served as it is, and cached as it is.
    assert sorted(os.listdir(img)) == ["f", "old-only"]
    assert (img / "f").read_text() == old_f
    assert errno_of(lambda: os.stat(img / "new-only")) == errno.ENOENT
    second.control("expire")
    # Mounted again: the new file, under new inode numbers, never the old listing.
    assert sorted(os.listdir(img)) == ["f", "new-only"]
    assert (img / "new-only").read_text() == "new"
    assert (img / "f").read_text() == new_f


def test_a_second_daemon_refuses_to_take_over(make_daemon: DaemonFactory) -> None:
    first = make_daemon()
    first.image("img", {"f": "served"})
    first.start()
    holder = spawn_holder(first.mountpoint / "img/f", alloc="job-1")
    try:
        assert first.process is not None
        command = first.command()
        # The same mountpoint with another state directory: the mount is alive, leave it.
        other_state = _with(command, "--state-dir", str(first.root / "state2"))
        out = subprocess.run(other_state, capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 1, out.stderr
        assert f"another FUSE daemon (uenvfs) serves {first.mountpoint}" in out.stderr
        # The same state directory with another mountpoint: its lock is held.
        other_mnt = _with(command, "--mountpoint", str(first.root / "mnt2"))
        out = subprocess.run(other_mnt, capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 1, out.stderr
        assert (f"another uenvfs (pid {first.process.pid}) uses the state directory "
                f"{first.state_dir}") in out.stderr
        # The first daemon goes on serving, its mounts untouched.
        assert (first.mountpoint / "img/f").read_text() == "served"
        assert first.backing_mounted("img")
        assert first.mount_status("img") is not None
    finally:
        release_holder(holder)


def _with(command: list[str], option: str, value: str) -> list[str]:
    changed = list(command)
    changed[changed.index(option) + 1] = value
    return changed


def test_program_map_output_is_bounded(daemon: Daemon) -> None:
    program = daemon.root / "lookup"
    # 2 GB of output within the program timeout, unless it is killed first.
    program.write_text('#!/bin/sh\nexec head -c 2000000000 /dev/zero\n')
    program.chmod(0o755)
    daemon.extra_args = ["--program-map", str(program)]
    daemon.config = "program_timeout = 20.0\n"
    daemon.expect(r"program map .* flood: more than 4097 bytes of output; killed")
    daemon.start()
    assert daemon.process is not None
    rss_before = _rss_kib(daemon.server_pid())
    started = time.monotonic()
    assert errno_of(lambda: os.stat(daemon.mountpoint / "flood")) == errno.ENOENT
    assert time.monotonic() - started < 5  # killed at once, not at the timeout
    assert _rss_kib(daemon.server_pid()) - rss_before < 20_000


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _fill(directory: Path) -> list[Path]:
    """Use up every inode of the filesystem of *directory*."""
    made: list[Path] = []
    for n in range(1000):
        path = directory / f"filler{n}"
        try:
            path.touch()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return made
        made.append(path)
    raise AssertionError(f"{directory} never filled up")


def test_a_full_state_directory_fails_commands_and_is_not_cached(
    make_daemon: DaemonFactory,
) -> None:
    daemon = make_daemon(hold_time=300.0)
    # A state directory on a tmpfs of 64 inodes, that the test fills up. (If the test fails,
    # the fixture's clean-up unmounts it with everything else.)
    small_state_dir = daemon.state_dir
    small_state_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nr_inodes=64,size=4m,mode=0755", "tmpfs",
                    str(small_state_dir)], check=True)
    daemon.image("used", {"f": "used"})
    daemon.image("later", {"f": "later"})
    daemon.expect("cannot write the journal")
    daemon.expect(r"control from .*: acquire used job-1: failed: cannot write the journal")
    daemon.expect(r"later: mount failed: cannot create .*: No space left on device")
    daemon.start()
    assert (daemon.mountpoint / "used/f").read_text() == "used"
    fillers = _fill(small_state_dir)

    # An acquisition must be on disk when the command returns: here it cannot be.
    assert errno_of(lambda: daemon.control("acquire used job-1")) == errno.EIO
    assert not list(small_state_dir.glob(".journal.json.*.tmp"))  # no temp file left behind
    # A first access that cannot create its backing directory fails ...
    assert errno_of(lambda: os.stat(daemon.mountpoint / "later/f")) == errno.EIO
    status = daemon.mount_status("later")
    assert status is not None
    assert status["state"] == "failed"
    assert "No space left on device" in status["error"]

    for path in fillers:
        path.unlink()
    # ... and works at once when the node has room again: the image was never at fault.
    assert (daemon.mountpoint / "later/f").read_text() == "later"
    daemon.control("acquire used job-1")  # now on disk
    assert '"job-1"' in (small_state_dir / "journal.json").read_text()
    daemon.control("release job-1")
    assert daemon.stop() == 0
    subprocess.run(["umount", str(small_state_dir)], check=True)


def test_paths_deeper_than_path_max_inside_an_image(daemon: Daemon) -> None:
    levels = [f"level{i:03d}-xxxxxxxxx" for i in range(300)]  # 5,999 bytes deep
    source = daemon.root / "deep-src"
    source.mkdir()
    (source / "leaf").write_text("deep\n")
    pack, path = [], ""
    for level in levels:
        path = f"{path}/{level}" if path else level
        pack.append(f"dir {path} 0755 0 0")
    pack.append(f"file {path}/leaf 0644 0 0 leaf")
    daemon.images.mkdir(parents=True, exist_ok=True)
    build_from_pack(daemon.images / "deep.sqfs", "\n".join(pack) + "\n", source)
    daemon.start()
    # Walk down one name at a time, as the kernel lets a job do.
    fd = os.open(daemon.mountpoint / "deep", os.O_PATH)
    try:
        for level in levels:
            fd, old = os.open(level, os.O_PATH | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(old)
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        try:
            assert os.listdir(listing) == ["leaf"]
        finally:
            os.close(listing)
        assert os.stat("leaf", dir_fd=fd).st_size == 5
        leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
        try:
            assert os.read(leaf, 100) == b"deep\n"
        finally:
            os.close(leaf)
    finally:
        os.close(fd)


def test_one_allocation_cannot_take_every_descriptor(daemon: Daemon) -> None:
    daemon.image("big", {f"f{n}": str(n) for n in range(40)})
    daemon.image("other", {"f": "other"})
    daemon.config = "open_files_per_allocation = 20\n"
    daemon.expect(r"greedy holds 20 open files in images: over its share \(20\); open refused")
    daemon.start()
    code = ("import os, sys\n"
            "fds = []\n"
            "for n in range(40):\n"
            "    try:\n"
            "        fds.append(os.open(os.path.join(sys.argv[1], f'f{n}'), os.O_RDONLY))\n"
            "    except OSError as exc:\n"
            "        print(len(fds), exc.errno, flush=True)\n"
            "        break\n"
            "sys.stdin.read()\n")
    env = {**os.environ, "PACT_ALLOCATION_ID": "greedy"}
    greedy = subprocess.Popen([sys.executable, "-c", code, str(daemon.mountpoint / "big")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert greedy.stdout is not None
        opened, error = greedy.stdout.readline().split()
        assert (int(opened), int(error)) == (20, errno.EMFILE)
        # Every other allocation goes on: reads, a first access, an acquisition.
        assert (daemon.mountpoint / "big/f39").read_text() == "39"
        assert (daemon.mountpoint / "other/f").read_text() == "other"
        daemon.control("acquire other job-2")
        daemon.control("release job-2")
        big = daemon.mount_status("big")
        assert big is not None
        assert big["allocations"]["greedy"]["opens"] == 20
    finally:
        assert greedy.stdin is not None
        greedy.stdin.close()
        greedy.wait(30)
        if greedy.stdout is not None:
            greedy.stdout.close()


def test_an_image_path_that_is_a_fifo_fails_and_blocks_nothing(daemon: Daemon) -> None:
    daemon.image("fine", {"f": "fine"})
    fifo = daemon.root / "pipe.sqfs"
    os.mkfifo(fifo)
    site_map = daemon.root / "site.map"
    site_map.write_text(f"piped {fifo}\n")
    daemon.extra_args = ["--map", str(site_map)]
    daemon.expect(r"piped: mount failed: image .*pipe.sqfs is not a regular file")
    daemon.start()
    assert errno_of(lambda: os.listdir(daemon.mountpoint / "piped")) == errno.EIO
    status = daemon.mount_status("piped")
    assert status is not None
    assert status["error"] == f"image {fifo} is not a regular file"
    assert (daemon.mountpoint / "fine/f").read_text() == "fine"


def test_listing_a_huge_directory_does_not_hold_up_other_images(daemon: Daemon) -> None:
    source = daemon.root / "huge-src"
    source.mkdir()
    (source / "empty").write_bytes(b"")
    entries = 60_000
    pack = "dir d 0755 0 0\n" + "".join(f"file d/entry{n:06d} 0644 0 0 empty\n"
                                        for n in range(entries))
    daemon.images.mkdir(parents=True, exist_ok=True)
    build_from_pack(daemon.images / "huge.sqfs", pack, source)
    daemon.image("small", {"f": "small"})
    daemon.start()
    assert (daemon.mountpoint / "small/f").read_text() == "small"
    assert os.listdir(daemon.mountpoint / "huge") == ["d"]  # mounted; d not listed yet
    started = time.monotonic()
    lister = subprocess.Popen(["sh", "-c", 'ls "$1" | wc -l', "sh",
                               str(daemon.mountpoint / "huge/d")],
                              stdout=subprocess.PIPE, text=True)
    try:
        slowest = 0.0
        while lister.poll() is None:
            # Another image answers meanwhile (before: it waited for the whole listing).
            began = time.monotonic()
            assert (daemon.mountpoint / "small/f").read_text() == "small"
            slowest = max(slowest, time.monotonic() - began)
            time.sleep(0.01)
        listing = time.monotonic() - started
        out, _ = lister.communicate(timeout=120)
        assert int(out) == entries
        print(f"listing {listing:.2f} s, slowest read of another image {slowest:.3f} s")
        assert slowest < listing / 4
    finally:
        stop_all([lister])


@contextlib.contextmanager
def storage_that_hangs(daemon: Daemon, files: dict[str, str | bytes]
                       ) -> Iterator[subprocess.Popen[bytes]]:
    """The image `slow` (of *files*) in a map, on a filesystem that stops answering when the
    process given is sent SIGSTOP: a squashfuse mount, standing in for a hung Lustre or NFS
    server; and the image `local` on local disk. The daemon is to be started; it is stopped
    at the end, and the storage goes on (SIGCONT) and is unmounted."""
    inner = build_image(daemon.root / "inner.sqfs", files).read_bytes()
    outer = build_image(daemon.root / "outer.sqfs", {"slow.sqfs": inner})
    store = daemon.root / "store"
    store.mkdir()
    squashfuse = subprocess.Popen(["squashfuse_ll", "-f", str(outer), str(store)])
    try:
        wait_until(lambda: is_mounted(store), what="the squashfuse store")
        site_map = daemon.root / "site.map"
        site_map.write_text(f"slow {store}/slow.sqfs\n")
        daemon.image("local", {"f": "local"})
        daemon.extra_args = ["--map", str(site_map)]
        yield squashfuse
    finally:
        squashfuse.send_signal(signal.SIGCONT)
        if daemon.process is not None:
            daemon.stop()
        subprocess.run(["fusermount3", "-u", "-z", str(store)], check=False)
        squashfuse.wait(30)


def stop_all(jobs: Iterable[subprocess.Popen[Any]]) -> None:
    for job in jobs:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_a_first_access_on_hung_storage_fails_in_time_and_blocks_nothing(
    daemon: Daemon,
) -> None:
    jobs: list[subprocess.Popen[str]] = []
    with storage_that_hangs(daemon, {"f": "slow"}) as storage:
        daemon.config = "mount_timeout = 3\n"
        daemon.expect(r"slow: mount failed: image .*slow.sqfs: no answer in 3 s")
        daemon.start()
        storage.send_signal(signal.SIGSTOP)
        try:
            job = subprocess.Popen(["cat", str(daemon.mountpoint / "slow/f")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # More waiting requests than pyfuse3's default of 99 at once (an opendir each:
            # the kernel does not serialize those as it does lookups).
            jobs = [subprocess.Popen(["ls", str(daemon.mountpoint / "slow")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True) for _ in range(120)]
            time.sleep(0.5)
            # Meanwhile everything else is served (before: the daemon itself hung, and with
            # 99 requests waiting a read of another image waited as long).
            assert answered(["cat", str(daemon.mountpoint / "local/f")], 1.5) == "local"
            assert '"local"' in answered(["cat", str(daemon.mountpoint / ".status")], 1.5)
            _, err = job.communicate(timeout=30)
            assert job.returncode == 1
            assert "Input/output error" in err
            for lister in jobs:
                _, err = lister.communicate(timeout=30)
                assert lister.returncode == 2
                assert "Input/output error" in err
            status = daemon.mount_status("slow")
            assert status is not None
            assert "no answer in 3 s" in status["error"]
        finally:
            stop_all(jobs)


def test_a_mounted_image_on_hung_storage_blocks_nothing_else(daemon: Daemon) -> None:
    # As above, but the image is mounted already when its storage stops answering: its reads,
    # lookups and listings that need the disk wait in worker threads of that image.
    big = os.urandom(4 << 20)
    # Enough entries that squashfs's own metadata cache (8 blocks) cannot hold them all.
    names = [f"entry-with-a-long-name-{i:05d}" for i in range(5000)]
    files: dict[str, str | bytes] = {"small": "small", "big": big,
                                     **{f"dir/{n}": n for n in names},
                                     **{f"other/{n}": n for n in names}}
    jobs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        stack.callback(stop_all, jobs)  # after the storage goes on again
        storage = stack.enter_context(storage_that_hangs(daemon, files))
        daemon.start()
        slow = daemon.mountpoint / "slow"
        assert (slow / "small").read_text() == "small"  # mounted, and its first pages cached
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        storage.send_signal(signal.SIGSTOP)
        try:
            jobs = [subprocess.Popen(command, stdout=subprocess.PIPE)
                    for command in (["cat", str(slow / "big")], ["ls", str(slow / "dir")],
                                    ["stat", "-c", "%s", str(slow / "other" / names[-1])])]
            time.sleep(0.5)
            # The read of big must wait for the storage. The lookup and the listing may not:
            # the kernel's squashfs can answer them from its own metadata cache.
            assert jobs[0].poll() is None, "the storage does not hang"
            # Meanwhile every other image, .status and .control are served (before: the
            # daemon itself waited in D state for the stopped storage).
            assert answered(["cat", str(daemon.mountpoint / "local/f")]) == "local"
            assert '"local"' in answered(["cat", str(daemon.mountpoint / ".status")])
            answered(["sh", "-c", f"echo expire > {daemon.mountpoint / '.control'}"])
            assert jobs[0].poll() is None
        finally:
            storage.send_signal(signal.SIGCONT)
        # The jobs that waited for the storage go on when it answers again, with the data.
        outputs = [job.communicate(timeout=30)[0] for job in jobs]
        assert [job.returncode for job in jobs] == [0, 0, 0]
        assert outputs[0] == big
        assert outputs[1].decode().split() == sorted(names)
        assert outputs[2].decode().strip() == str(len(names[-1]))
        # The listing is kept, and what waited for the storage waited in worker threads.
        assert metric(daemon, "uenvfs_listing_cache_bytes") > len(names) * 360
        assert metric(daemon, "uenvfs_storage_waits_total") >= 2


def test_a_reload_with_a_hung_map_file_fails_in_time_and_blocks_nothing(daemon: Daemon) -> None:
    site_map = daemon.root / "site.map"
    site_map.write_text(f"mapped {daemon.image('local', {'f': 'local'})}\n")
    daemon.extra_args = ["--map", str(site_map)]
    daemon.config = "mount_timeout = 2\n"
    daemon.expect(r"image sources gave no answer in 2(\.0)? s")
    daemon.start()
    # The map file now blocks its reader, as one on a hung NFS server would.
    site_map.unlink()
    os.mkfifo(site_map)
    reload = subprocess.Popen([sys.executable, "-m", "uenvfs", "reload", "--mountpoint",
                               str(daemon.mountpoint)], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        assert reload.poll() is None
        # Meanwhile the images and .status are served. (The kernel serializes writes to
        # .control: a command written now waits for the reload to give up.)
        assert answered(["cat", str(daemon.mountpoint / "mapped/f")], 1.5) == "local"
        assert '"mapped"' in answered(["cat", str(daemon.mountpoint / ".status")], 1.5)
        _, err = reload.communicate(timeout=10)
        assert reload.returncode == 1
        assert "Input/output error" in err
        # The listing is kept, and later commands are not held up.
        assert sorted(n for n in os.listdir(daemon.mountpoint) if n[0] != ".") == [
            "local", "mapped"]
        answered(["sh", "-c", f"echo expire > {daemon.mountpoint / '.control'}"], 1.5)
    finally:
        stop_all([reload])
        with open(site_map, "w"):  # the reader given up on goes
            pass
