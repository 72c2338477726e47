"""Fixtures: a factory of real `uenvfs serve` daemons that checks for leaks after each test."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .mounts import clean_up, is_mounted, loops_for, mounts_under, wait_until
from .support import Daemon

FUSE_REASON = None
if os.geteuid() != 0:
    FUSE_REASON = "needs root (kernel loop mounts and allow_other)"
elif not os.path.exists("/dev/fuse"):
    FUSE_REASON = "needs /dev/fuse"
elif shutil.which("gensquashfs") is None:
    FUSE_REASON = "needs gensquashfs (squashfs-tools-ng) to build test images"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A real-mount test skips, with the reason, where it cannot run; in CI (root and
    /dev/fuse are there) it fails instead: a skipped test there would hide a broken setup."""
    if FUSE_REASON is None or not item.get_closest_marker("fuse"):
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI cannot run a real-mount test: {FUSE_REASON}", pytrace=False)
    pytest.skip(FUSE_REASON)


DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A scratch directory that every user can traverse (tmp_path is root-only), so that
    jobs running as other users can reach the mountpoint inside it."""
    path = Path(tempfile.mkdtemp(prefix="uenvfs-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    if not mounts_under(path):  # never let rmtree walk into a mount
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(world_tmp: Path) -> Iterator[DaemonFactory]:
    """Create (not start) daemons in a scratch directory; stop and leak-check them afterwards.

    A test fails if its daemon leaves a mount or loop device behind (unless it allowed that
    because it killed the daemon on purpose) or logs an undeclared warning, error or traceback.
    """
    daemons: list[Daemon] = []

    def make(**kwargs: Any) -> Daemon:
        root = kwargs.pop("root", world_tmp)
        daemon = Daemon(root, **kwargs)
        daemons.append(daemon)
        return daemon

    yield make

    problems = []
    for daemon in daemons:
        if daemon.process is not None and daemon.process.poll() is None:
            code = daemon.stop()
            if code != 0:
                problems.append(f"uenvfs serve exited {code} on SIGTERM")
        if daemon.process is not None and daemon.processes_left():
            daemon.kill()
            problems.append("uenvfs processes left running after the keeper exited")
    roots = {d.root for d in daemons}
    for root in roots:
        # A loop device is detached once the last opener of it closes it, which need not be
        # the daemon's unmount (udev may be probing it): give it a moment.
        with contextlib.suppress(AssertionError):
            wait_until(functools.partial(_no_loops, root), timeout=5.0)
        left = clean_up(root)
        if left and not all(d.allow_leftovers for d in daemons if d.root == root):
            problems.append("left behind: " + ", ".join(left))
    for daemon in daemons:
        bad = daemon.unexpected_log_lines()
        if bad:
            problems.append("unexpected log lines:\n  " + "\n  ".join(bad[:20]))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _no_loops(root: Path) -> bool:
    return not loops_for(root)


@pytest.fixture
def daemon(make_daemon: DaemonFactory) -> Daemon:
    """A daemon with an image directory, not started yet (add images first)."""
    d = make_daemon()
    d.images.mkdir(parents=True, exist_ok=True)
    return d


MOUNT_POINTS = ("/user-environment", "/user-tools")


@pytest.fixture
def mount_points() -> Iterator[None]:
    """/user-environment and /user-tools exist (as on a uenv system) during the test."""
    made = []
    for path in map(Path, MOUNT_POINTS):
        if not path.exists():
            path.mkdir(mode=0o755)
            made.append(path)
    try:
        yield
    finally:
        for path in map(Path, MOUNT_POINTS):
            assert not is_mounted(path), f"{path} was left mounted outside any namespace"
        for path in made:
            path.rmdir()
