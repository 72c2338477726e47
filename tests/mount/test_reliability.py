"""Faults and hostile input through the real mount: the daemon keeps serving, leaks nothing,
hangs nothing, and lets nobody out of the images."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ..support import (
    Daemon,
    errno_of,
    loop_count,
    metric,
    mounts_under,
    release_holder,
    run_in,
    spawn_holder,
    wait_until,
)

pytestmark = pytest.mark.fuse


# -- hostile names -------------------------------------------------------------------------


def test_hostile_names_and_symlinks_pointing_out(daemon: Daemon) -> None:
    daemon.image("img", {"ok": "fine"})
    src = daemon.root / "evil-src"
    src.mkdir()
    (src / "evil").symlink_to("/etc")
    (src / "evil2").symlink_to("../../../../../../../etc")
    (src / ("n" * 255)).write_text("long name")
    subprocess.run(["gensquashfs", "-q", "-k", "-D", str(src), str(daemon.images / "links.sqfs")],
                   check=True)
    (daemon.root / "secret").write_text("next to the images\n")
    daemon.start()
    root = os.fsencode(daemon.mountpoint)
    # ".." and "." never reach the daemon: the kernel resolves them itself.
    for name in (b"n" * 255, b"\xff\xfe", b"secret", b"images", b"img.sqfs", b"state",
                 b"uenvfs.log", b"mnt", b"img/nothing", b"links/evil/../../secret"):
        path = root + b"/" + name
        assert errno_of(functools.partial(os.stat, path)) == errno.ENOENT, name
    for length in (256, 1025, 4000):  # whatever the kernel lets through is not an image
        code = errno_of(functools.partial(os.stat, root + b"/" + b"n" * length))
        assert code in (errno.ENOENT, errno.ENAMETOOLONG), length
    assert (daemon.mountpoint / "links" / ("n" * 255)).read_text() == "long name"
    links = daemon.mountpoint / "links"
    assert stat.S_ISLNK(os.lstat(links / "evil").st_mode)
    assert os.readlink(links / "evil") == "/etc"
    assert os.readlink(links / "evil2") == "../../../../../../../etc"
    # Following them is the caller's kernel resolving a path on the host, as for any symlink;
    # the daemon itself never looked past the link (nothing outside the image is served).
    assert daemon.backing_mounted("links")
    assert "ENOTDIR" not in daemon.log()


# -- broken images -------------------------------------------------------------------------


def image_bytes(daemon: Daemon) -> bytes:
    files = {f"d{i}/f{j}": os.urandom(5000) for i in range(20) for j in range(10)}
    path = daemon.image("template", files)
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.mark.parametrize("damage", ["truncated", "random", "magic", "empty"])
def test_broken_image_is_eio_with_the_reason(daemon: Daemon, damage: str) -> None:
    good = image_bytes(daemon)
    broken = {
        "truncated": good[: len(good) // 2],
        "random": os.urandom(len(good)),
        "magic": b"XXXX" + good[4:],
        "empty": b"",
    }[damage]
    (daemon.images / "broken.sqfs").write_bytes(broken)
    daemon.image("good", {"f": "fine"})
    daemon.expect("broken: mount failed")
    daemon.start()
    for _ in range(1000):
        assert errno_of(lambda: os.listdir(daemon.mountpoint / "broken")) == errno.EIO
    status = daemon.mount_status("broken")
    assert status is not None
    assert status["state"] == "failed"
    assert status["error"]
    # The negative cache: a thousand accesses, one mount attempt.
    assert metric(daemon, 'uenvfs_mount_attempts_total{image="broken"}') == 1
    assert daemon.log().count("broken: mount failed") == 1
    assert (daemon.mountpoint / "good/f").read_text() == "fine"
    assert not daemon.backing_mounted("broken")


def test_image_deleted_while_mounted(daemon: Daemon) -> None:
    path = daemon.image("img", {"f": "still here"})
    daemon.expect("img: mount failed")
    daemon.start()
    holder = spawn_holder(daemon.mountpoint / "img/f", alloc="job-1")
    path.unlink()
    assert (daemon.mountpoint / "img/f").read_text() == "still here"  # the loop device has it
    release_holder(holder)
    daemon.wait_idle("img")
    daemon.control("expire")
    assert errno_of(lambda: (daemon.mountpoint / "img/f").read_text()) == errno.EIO
    status = daemon.mount_status("img")
    assert status is not None
    assert "No such file" in status["error"]


def test_image_directory_disappears(daemon: Daemon) -> None:
    daemon.image("a", {"f": "a"})
    daemon.image("b", {"f": "b"})
    daemon.expect("image directory .* unreadable")
    daemon.start()
    holder = spawn_holder(daemon.mountpoint / "a/f", alloc="job-1")
    moved = daemon.root / "images-moved"
    daemon.images.rename(moved)
    daemon.control("reload")
    try:
        assert sorted(os.listdir(daemon.mountpoint)) == [".control", ".metrics", ".socket",
                                                          ".status"]
        assert (daemon.mountpoint / "a/f").read_text() == "a"  # in use: still served
        assert errno_of(lambda: os.listdir(daemon.mountpoint / "b")) == errno.ENOENT
    finally:
        release_holder(holder)
    moved.rename(daemon.images)
    daemon.control("reload")
    assert (daemon.mountpoint / "b/f").read_text() == "b"


# -- mount tools that hang or are missing ---------------------------------------------------


@pytest.mark.parametrize(("tool", "backend"), [("squashfuse_ll", "squashfuse"),
                                             ("rdsquashfs", "kernel")])
def test_hanging_mount_tool_is_killed(daemon: Daemon, tool: str, backend: str) -> None:
    tools = daemon.root / "tools"
    tools.mkdir()
    fake = tools / tool
    real = shutil.which(tool)
    fake.write_text('#!/bin/sh\ncase "$*" in *hang.sqfs*) exec sleep 3600;; esac\n'
                    f'exec {real} "$@"\n')
    fake.chmod(0o755)
    daemon.env = {"PATH": f"{tools}:{os.environ['PATH']}"}
    daemon.config = "mount_timeout = 1.5\n"
    daemon.extra_args = ["--backend", backend]
    daemon.image("hang", {"f": "never"})
    daemon.image("good", {"f": "fine"})
    daemon.expect("hang: mount failed")
    daemon.start()
    started = time.monotonic()
    assert errno_of(lambda: os.listdir(daemon.mountpoint / "hang")) == errno.EIO
    assert time.monotonic() - started < 15  # the caller is not left hanging
    status = daemon.mount_status("hang")
    assert status is not None
    assert f"{tool} killed after 1.5 s" in status["error"]
    assert (daemon.mountpoint / "good/f").read_text() == "fine"
    assert not subprocess.run(["pgrep", "-f", "sleep 3600"], capture_output=True).stdout


@pytest.mark.parametrize(("backend", "message"), [
    ("kernel", "validating images needs rdsquashfs (squashfs-tools-ng), not found in PATH"),
    ("squashfuse", "backend squashfuse needs squashfuse, fusermount3 (not found in PATH)"),
])
def test_missing_tool_is_a_clear_startup_error(daemon: Daemon, backend: str,
                                               message: str) -> None:
    empty = daemon.root / "empty-path"
    empty.mkdir()
    daemon.extra_args = ["--backend", backend]
    result = subprocess.run(daemon.command(), env={**os.environ, "PATH": str(empty)},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert mounts_under(daemon.root) == []


# -- processes and the daemon itself --------------------------------------------------------


def test_killed_process_releases_its_handles(daemon: Daemon) -> None:
    daemon.image("img", {"f": "x"})
    daemon.start()
    holder = spawn_holder(daemon.mountpoint / "img/f", alloc="doomed")
    assert daemon.mount_status("img")["refcount"] == 1  # type: ignore[index]
    holder.kill()
    holder.wait()
    assert holder.stdin is not None
    assert holder.stdout is not None
    holder.stdin.close()
    holder.stdout.close()
    wait_until(lambda: daemon.mount_status("img")["refcount"] == 0,  # type: ignore[index]
               what="the kernel to release the killed process's handle")


def test_stopped_daemon_makes_callers_wait_not_fail(daemon: Daemon) -> None:
    daemon.image("img", {"f": "patience"})
    daemon.start()
    assert (daemon.mountpoint / "img/f").read_text() == "patience"
    assert daemon.process is not None
    mounts_before = daemon.backing_mounts()
    server = daemon.server_pid()
    os.kill(server, signal.SIGSTOP)
    try:
        reader = subprocess.Popen(["cat", str(daemon.mountpoint / "img/f")],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        assert reader.poll() is None  # waiting, not failing
    finally:
        os.kill(server, signal.SIGCONT)
    out, _ = reader.communicate(timeout=30)
    assert (reader.returncode, out) == (0, "patience")
    assert daemon.backing_mounts() == mounts_before


def test_thousand_images_list_without_mounting(daemon: Daemon) -> None:
    template = daemon.image("i0000", {"f": "x"})
    for i in range(1, 1000):
        os.link(template, daemon.images / f"i{i:04d}.sqfs")
    daemon.start()
    started = time.perf_counter()
    result = run_in(daemon.mountpoint, "ls | wc -l")
    elapsed = time.perf_counter() - started
    assert result.stdout.strip() == "1000"
    assert daemon.backing_mounts() == []
    assert daemon.status()["mounts"] == []
    print(f"listing 1000 images: {elapsed * 1000:.1f} ms (ls in a shell, process start included)")


# -- churn -----------------------------------------------------------------------------------

WORKER = r"""
import json, os, random, select, sys, time
root, alloc, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
images = sys.argv[4:]
rng = random.Random(seed)
held = []  # (image, file object)
sitting = None  # the image the working directory is in
reads = errors = 0
last_error = ""
def say(obj):
    print(json.dumps(obj), flush=True)
while True:
    if select.select([sys.stdin], [], [], 0)[0]:
        command = sys.stdin.readline().strip()
        if command == "pause":
            say({"held": [image for image, _ in held], "cwd": sitting})
            sys.stdin.readline()  # resume
        elif command in ("stop", ""):
            break
    try:
        if rng.random() < 0.02:  # now and then, sit in an image, or leave
            sitting = None if sitting else images[rng.randrange(len(images))]
            where = os.path.join(root, sitting, "d0") if sitting else "/"
            doing = "chdir " + where
            os.chdir(where)
            if sitting:
                # A cd alone may mount nothing (the kernel may still know the names of an
                # unmounted image); a look around does, and from then on it must stay.
                doing = "listdir of " + where
                os.listdir(".")
        if held and (len(held) >= 3 or rng.random() < 0.5):
            _, f = held.pop(rng.randrange(len(held)))
            doing = "close"
            f.close()
        else:
            # The images in use drift with time, so the idle ones unmount under the load.
            image = images[(int(time.monotonic() * 4) + rng.randrange(3)) % len(images)]
            path = os.path.join(root, image, "d%d/f%d" % (rng.randrange(4), rng.randrange(5)))
            doing = "open " + path
            f = open(path, "rb")
            held.append((image, f))
        doing = "read"
        for _, f in held:
            f.seek(0)
            if len(f.read()) != 4096:
                raise OSError("short read")
            reads += 1
    except OSError as exc:
        errors += 1
        last_error = "%s: %r" % (doing, exc)  # which call, on which path
for _, f in held:
    f.close()
say({"reads": reads, "errors": errors, "last_error": last_error})
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


Uses = dict[str, dict[str, dict[str, int]]]  # image -> allocation -> {"opens", "cwd"}
Workers = list[tuple[str, subprocess.Popen[str]]]  # (allocation, process)


def start_workers(daemon: Daemon, count: int, allocs: int, names: list[str]) -> Workers:
    """*count* WORKER processes over the images *names*, of *allocs* allocations in turn."""
    workers: Workers = []
    for n in range(count):
        alloc = f"alloc-{n % allocs}"
        workers.append((alloc, subprocess.Popen(
            [sys.executable, "-c", WORKER, str(daemon.mountpoint), alloc, str(n), *names],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PACT_ALLOCATION_ID": alloc})))
    return workers


def _tell(workers: Workers, word: str) -> None:
    for _, w in workers:
        assert w.stdin is not None
        w.stdin.write(word + "\n")
        w.stdin.flush()


def pause_workers(workers: Workers) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Hold every worker still; what they hold open, and where they sit, by allocation."""
    _tell(workers, "pause")
    held: dict[str, list[str]] = {}
    sitting: dict[str, list[str]] = {}
    for alloc, w in workers:
        assert w.stdout is not None
        report = json.loads(w.stdout.readline())
        held.setdefault(alloc, []).extend(report["held"])
        sitting.setdefault(alloc, []).extend([report["cwd"]] if report["cwd"] else [])
    return held, sitting


def resume_workers(workers: Workers) -> None:
    _tell(workers, "resume")


def stop_workers(workers: Workers) -> list[dict[str, Any]]:
    """Stop every worker; their reports (reads, errors, last_error)."""
    results = []
    for _, w in workers:
        assert w.stdin is not None
        assert w.stdout is not None
        w.stdin.write("stop\n")
        w.stdin.close()
        results.append(json.loads(w.stdout.readline() or "{}"))
        w.wait(30)
        w.stdout.close()
    return results


def wait_for_uses(daemon: Daemon, want: Uses) -> None:
    """Releases of closed files reach the daemon asynchronously: allow them to land."""
    try:
        wait_until(functools.partial(lambda w: observed_uses(daemon) == w, want),
                   timeout=10, what="refcounts to match what the workers hold")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: want {want}, have {observed_uses(daemon)}") from None


def expected_uses(held: dict[str, list[str]], sitting: dict[str, list[str]]) -> Uses:
    by_image: Uses = {}
    for kind, found in (("opens", held), ("cwd", sitting)):
        for alloc, images in found.items():
            for image in images:
                use = by_image.setdefault(image, {}).setdefault(alloc, {"opens": 0, "cwd": 0})
                use[kind] += 1
    return by_image


def observed_uses(daemon: Daemon) -> Uses:
    result = {}
    for m in daemon.status()["mounts"]:
        assert m["refcount"] == len(m["allocations"]) >= 0
        uses = {a: {"opens": u["opens"], "cwd": u["cwd"]} for a, u in m["allocations"].items()}
        assert all(u["opens"] > 0 or u["cwd"] > 0 for u in uses.values())
        if uses:
            result[m["name"]] = uses
    return result


def test_churn_keeps_refcounts_exact(daemon: Daemon) -> None:
    seconds = float(os.environ.get("UENVFS_CHURN_SECONDS", "60"))
    daemon.hold_time = 0.05
    names = [f"img{i}" for i in range(8)]
    for name in names:
        daemon.image(name, {f"d{d}/f{f}": os.urandom(4096) for d in range(4) for f in range(5)})
    loops_before = loop_count(daemon.root)
    daemon.start()
    assert daemon.process is not None
    workers = start_workers(daemon, 32, 8, names)
    rss: list[int] = []
    checkpoints = 0
    sat = 0  # workers found sitting in an image at checkpoints
    mounts_seen = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            time.sleep(min(2.0, max(0.0, end - time.monotonic())))
            held, sitting = pause_workers(workers)
            wait_for_uses(daemon, expected_uses(held, sitting))
            # A scan of the processes agrees with every count.
            verified = daemon.cli("status", "--verify")
            assert (verified.returncode, verified.stdout) == (
                0, "every count agrees with the processes\n"), verified.stdout
            sat += sum(map(len, sitting.values()))
            mounts_seen = max(mounts_seen, len(daemon.backing_mounts()))
            checkpoints += 1
            rss.append(rss_kib(daemon.server_pid()))
            resume_workers(workers)
    finally:
        results = stop_workers(workers)
    reads = sum(r.get("reads", 0) for r in results)
    errors = sum(r.get("errors", 0) for r in results)
    assert errors == 0, [r["last_error"] for r in results if r.get("errors")]
    assert reads > 1000
    assert checkpoints >= 3
    assert sat > 0  # the workers did sit in images
    mount_count = metric(daemon, "uenvfs_mount_seconds_count")
    assert mount_count > len(names)  # images really did unmount and mount again under load
    wait_until(lambda: daemon.backing_mounts() == [], what="every image to unmount at the end")
    wait_until(lambda: loop_count(daemon.root) == loops_before,
               what="every loop device to be detached")
    growth = rss[-1] - rss[0]
    print(f"churn: {reads} reads, {checkpoints} checkpoints ({sat} workers sitting in "
          f"images), {int(mount_count)} mounts, "
          f"RSS {rss[0]} -> {rss[-1]} KiB")
    assert growth < 20 * 1024, f"daemon RSS grew by {growth} KiB"


def test_each_image_version_is_validated_once(daemon: Daemon) -> None:
    path = daemon.image("img", {"f": "one"})
    daemon.start()
    assert (daemon.mountpoint / "img/f").read_text() == "one"
    daemon.control("expire")
    assert (daemon.mountpoint / "img/f").read_text() == "one"
    assert metric(daemon, "uenvfs_mount_attempts_total{image=\"img\"}") == 2
    assert metric(daemon, "uenvfs_check_seconds_count") == 1  # same file: not checked again
    daemon.control("expire")
    new = daemon.image("new", {"f": "two"})
    os.rename(new, path)
    assert (daemon.mountpoint / "img/f").read_text() == "two"
    assert metric(daemon, "uenvfs_check_seconds_count") == 2  # a new version is checked


def test_inode_table_shrinks_when_the_kernel_forgets(daemon: Daemon) -> None:
    daemon.image("big", {f"d{d}/f{f}": "x" for d in range(20) for f in range(50)})
    daemon.start()
    for _ in os.walk(daemon.mountpoint / "big"):
        pass
    walked = metric(daemon, "uenvfs_known_inodes")
    assert walked >= 1000
    # Dropping the kernel's dentries and inodes makes it send FORGETs for them.
    Path("/proc/sys/vm/drop_caches").write_text("2")
    wait_until(lambda: metric(daemon, "uenvfs_known_inodes") < walked / 10,
               what="the FORGETs to shrink the inode table")
