"""Lazy mounting through a real FUSE mount: browsing, first access, errors, shutdown."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..support import Daemon, errno_of, loop_count, mounts_under, run_in, wait_until

pytestmark = pytest.mark.fuse


@pytest.mark.parametrize("linger", ["", "linger_us = 0\n"], ids=["linger", "no-linger"])
def test_shell_cd_ls_cat(daemon: Daemon, linger: str) -> None:
    daemon.image("tools", {"README": "read me\n", "share/data.txt": "42\n"})
    daemon.config = linger  # polling for the next request or not: both serve the same
    daemon.start()
    result = run_in(daemon.mountpoint, "cd tools && ls && cat README && cat share/data.txt")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "README\nshare\nread me\n42\n"
    assert daemon.backing_mounted("tools")
    # Bigger readahead windows through the mount (fewer, larger FUSE reads of big files).
    (fuse,) = [e for e in mounts_under(daemon.mountpoint) if e.fstype == "fuse.uenvfs"]
    knob = Path("/sys/class/bdi") / fuse.major_minor / "read_ahead_kb"
    assert knob.read_text().strip() == "1024"


def test_listing_the_root_mounts_nothing(daemon: Daemon) -> None:
    for name in ("a", "b-1.0", "c_2"):
        daemon.image(name, {"f": name})
    build = daemon.images / "other.squashfs"
    os.rename(daemon.image("other", {"f": "x"}), build)
    (daemon.images / "notes.txt").write_text("not an image\n")
    daemon.start()
    listing = run_in(daemon.mountpoint, "ls").stdout.split()
    assert listing == ["a", "b-1.0", "c_2", "other"]
    hidden = sorted(os.listdir(daemon.mountpoint))
    assert hidden == [".control", ".metrics", ".socket", ".status", "a", "b-1.0", "c_2",
                      "other"]
    long = run_in(daemon.mountpoint, "ls -l; stat a >/dev/null")
    assert long.returncode == 0, long.stderr
    assert daemon.backing_mounts() == []
    assert daemon.status()["mounts"] == []


def test_sixteen_first_accesses_make_one_mount(daemon: Daemon) -> None:
    daemon.image("shared", {"data": "x" * 10000})
    daemon.start()
    go = daemon.root / "go"
    script = (f"while [ ! -e {go} ]; do :; done; "
              f"cat {daemon.mountpoint}/shared/data | wc -c")
    procs = [subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
             for _ in range(16)]
    time.sleep(0.3)
    go.touch()
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 16
    assert outputs == ["10000\n"] * 16
    mounts = [e for e in daemon.backing_mounts() if e.mount_point.endswith("/shared")]
    assert len(mounts) == 1
    assert daemon.log().count("shared: mounted") == 1


@pytest.mark.parametrize(
    ("what", "action"),
    [
        ("write", lambda p: open(p / "file", "r+b")),  # noqa: SIM115
        ("truncate", lambda p: os.truncate(p / "file", 0)),
        ("create", lambda p: open(p / "new", "wb")),  # noqa: SIM115
        ("append", lambda p: open(p / "file", "ab")),  # noqa: SIM115
        ("unlink", lambda p: os.unlink(p / "file")),
        ("rename", lambda p: os.rename(p / "file", p / "moved")),
        ("chmod", lambda p: os.chmod(p / "file", 0o777)),
        ("chown", lambda p: os.chown(p / "file", 1, 1)),
        ("utime", lambda p: os.utime(p / "file", (1, 1))),
        ("mkdir", lambda p: os.mkdir(p / "dir")),
        ("rmdir", lambda p: os.rmdir(p / "sub")),
        ("symlink", lambda p: os.symlink("file", p / "link")),
        ("hardlink", lambda p: os.link(p / "file", p / "link")),
        ("mknod", lambda p: os.mkfifo(p / "fifo")),
        ("setxattr", lambda p: os.setxattr(p / "file", "user.x", b"1")),
        ("removexattr", lambda p: os.removexattr(p / "file", "user.x")),
        ("mkdir at root", lambda p: os.mkdir(p.parent / "newimage")),
        ("rmdir image", lambda p: os.rmdir(p)),
    ],
)
def test_everything_that_writes_is_erofs(daemon: Daemon, what: str, action: object) -> None:
    daemon.image("ro", {"file": "content", "sub/x": "y"})
    daemon.start()
    image = daemon.mountpoint / "ro"
    assert errno_of(lambda: action(image)) == errno.EROFS, what  # type: ignore[operator]
    assert (image / "file").read_text() == "content"


@pytest.mark.parametrize(
    "name",
    ["missing", "..", ".", "notes.txt", "notes", "other.sqfs", "a b", "x" * 255, ".hidden",
     "images", "state", "mnt", b"\xff\xfe".decode("latin-1")],
)
def test_unknown_and_malformed_names_are_enoent(daemon: Daemon, name: str) -> None:
    daemon.image("other", {"f": "1"})
    (daemon.images / "notes.txt").write_text("next to the images\n")
    (daemon.images / ".hidden.sqfs").write_bytes((daemon.images / "other.sqfs").read_bytes())
    daemon.start()
    path = os.path.join(str(daemon.mountpoint), name)
    if name in ("..", "."):
        # The kernel resolves these itself; they must not lead into an image.
        assert os.path.realpath(path) in (str(daemon.mountpoint), str(daemon.root))
        return
    with pytest.raises(FileNotFoundError):
        os.stat(path)
    with pytest.raises(FileNotFoundError):
        os.listdir(path)
    assert daemon.backing_mounts() == []


def test_non_utf8_name_is_enoent(daemon: Daemon) -> None:
    daemon.start()
    with pytest.raises(FileNotFoundError):
        os.stat(os.fsencode(daemon.mountpoint) + b"/\xff\xfe")


@pytest.mark.parametrize("validate", [True, False])
def test_corrupt_image_is_eio_with_the_reason_logged(daemon: Daemon, validate: bool) -> None:
    (daemon.images / "broken.sqfs").write_bytes(os.urandom(64 * 1024))
    daemon.image("good", {"f": "fine"})
    daemon.config = f"validate = {str(validate).lower()}\n"
    daemon.expect(r"broken: mount failed")
    daemon.start()
    assert errno_of(lambda: os.listdir(daemon.mountpoint / "broken")) == errno.EIO
    log = daemon.log()
    assert "broken: mount failed" in log
    if validate:  # refused before the kernel sees it
        assert "is not valid: not a SquashFS image (wrong magic number" in log
    else:  # the kernel refused it: the failing call and its error are in the log
        assert re.search(r"mount /dev/loop\d+ on \S+/broken \(squashfs\): Invalid argument", log)
    assert (daemon.mountpoint / "good/f").read_text() == "fine"
    assert not daemon.backing_mounted("broken")


def test_inode_numbers_stable_across_remount(daemon: Daemon) -> None:
    daemon.image("stable", {"a/b/c": "deep", "top": "t"})
    daemon.start()
    image = daemon.mountpoint / "stable"
    before = {p: os.lstat(image / p).st_ino for p in ("a", "a/b", "a/b/c", "top")}
    daemon.control("expire")
    assert not daemon.backing_mounted("stable")
    # A fresh process walks the same paths: the kernel's cached entries still work.
    code = ("import os, sys; print([os.lstat(os.path.join(sys.argv[1], p)).st_ino "
            "for p in ('a', 'a/b', 'a/b/c', 'top')])")
    out = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == str(list(before.values()))
    assert (image / "a/b/c").read_text() == "deep"
    assert daemon.backing_mounted("stable")


def test_sigterm_unmounts_everything(daemon: Daemon) -> None:
    loops_before = loop_count(daemon.root)
    for name in ("one", "two", "three"):
        daemon.image(name, {"f": name})
    daemon.start()
    for name in ("one", "two", "three"):
        assert (daemon.mountpoint / name / "f").read_text() == name
    assert len(daemon.backing_mounts()) == 3
    assert loop_count(daemon.root) == loops_before + 3
    assert daemon.stop(signal.SIGTERM) == 0
    assert mounts_under(daemon.root) == []
    wait_until(lambda: loop_count(daemon.root) == loops_before, what="loop devices to be detached")


def test_sigint_stops_cleanly_too(daemon: Daemon) -> None:
    daemon.image("one", {"f": "1"})
    daemon.start()
    assert (daemon.mountpoint / "one/f").read_text() == "1"
    assert daemon.stop(signal.SIGINT) == 0
    assert mounts_under(daemon.root) == []


def test_stale_fuse_mount_of_a_killed_daemon_is_cleared(daemon: Daemon) -> None:
    daemon.image("one", {"f": "1"})
    daemon.start()
    daemon.kill()
    # ENOTCONN; ECONNABORTED if the request was already queued when the connection ended.
    assert errno_of(lambda: os.listdir(daemon.mountpoint)) in (errno.ENOTCONN,
                                                                 errno.ECONNABORTED)
    daemon.expect("clearing a FUSE mount left at")
    daemon.expect("a stale mount sits at")
    daemon.start()
    assert (daemon.mountpoint / "one/f").read_text() == "1"
    fuse = [e for e in mounts_under(daemon.mountpoint) if e.fstype == "fuse.uenvfs"]
    assert len(fuse) == 1


def test_squashfuse_backend(daemon: Daemon) -> None:
    daemon.extra_args = ["--backend", "squashfuse"]
    daemon.image("user", {"bin/tool": "#!/bin/sh\necho via squashfuse\n", "a/b": "deep"},
                 mode=0o755)
    daemon.start()
    image = daemon.mountpoint / "user"
    assert run_in(image, "./bin/tool").stdout == "via squashfuse\n"
    ino = os.stat(image / "a/b").st_ino
    (entry,) = daemon.backing_mounts()
    assert entry.fstype.startswith("fuse.squashfuse")
    daemon.control("expire")
    assert daemon.backing_mounts() == []
    assert (image / "a/b").read_text() == "deep"
    assert os.stat(image / "a/b").st_ino == ino
    assert [e.fstype for e in daemon.backing_mounts()] == [entry.fstype]
