"""uenv repositories served by a real daemon: each image once under its id, each label a
symlink to it; the node's system only; tags of one image share one mount and one refcount;
a tag moved by a pull is followed at the next reload; a missing image file is skipped."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ..support import Daemon, build_image, release_holder, spawn_holder, wait_until
from ..uenv_repos import Pulled, make_repository, pull
from .test_slurm import _script

pytestmark = pytest.mark.fuse


def _pulled(root: Path, text: str, date: str, system: str, version: str,
            tags: tuple[str, ...]) -> Pulled:
    image = build_image(root / f"{text}.sqfs", {"which": f"{text}\n"})
    return Pulled(image.read_bytes(), date, system, "gh200", "prgenv-gnu", version, tags)


def test_repository_served_by_id_with_label_links(daemon: Daemon) -> None:
    work = daemon.root / "built"
    new = _pulled(work, "new", "2024-11-20", "daint", "24.11", ("v1", "latest"))
    old = _pulled(work, "old", "2024-07-01", "daint", "24.7", ("v1",))
    eiger = _pulled(work, "eiger", "2024-11-21", "eiger", "24.11", ("v1",))
    gone = _pulled(work, "gone", "2024-10-01", "daint", "24.9", ("v1",))
    repo = make_repository(daemon.root / "repo", [new, old, eiger, gone])
    (repo / "images" / gone.sha256 / "store.squashfs").unlink()
    daemon.config = 'system = "daint"\nuarch = "gh200"\n'
    daemon.extra_args = ["--repo", str(repo)]
    daemon.expect(r"uenv repository: .*prgenv-gnu/24.9:v1@daint%gh200: no image file")
    daemon.start()
    mp = daemon.mountpoint
    names = sorted(n for n in os.listdir(mp) if not n.startswith("."))
    labels = ["prgenv-gnu+24.11+latest", "prgenv-gnu+24.11+v1", "prgenv-gnu+24.7+v1"]
    assert names == sorted([new.sha256[:16], old.sha256[:16], *labels])
    assert os.readlink(mp / "prgenv-gnu+24.11+v1") == new.sha256[:16]
    assert os.readlink(mp / "prgenv-gnu+24.11+latest") == new.sha256[:16]
    assert (mp / "prgenv-gnu+24.7+v1" / "which").read_text() == "old\n"
    assert not (mp / eiger.sha256[:16]).exists()  # another system's

    # Two labels of one image: one mount, one refcount for the allocation.
    a = spawn_holder(mp / "prgenv-gnu+24.11+v1" / "which", alloc="job-1")
    b = spawn_holder(mp / "prgenv-gnu+24.11+latest" / "which", alloc="job-1")
    try:
        entry = daemon.mount_status(new.sha256[:16])
        assert entry is not None
        assert (entry["refcount"], entry["allocations"]["job-1"]["opens"]) == (1, 2)
        assert entry["labels"] == ["prgenv-gnu/24.11:latest@daint%gh200",
                                   "prgenv-gnu/24.11:v1@daint%gh200"]
        table = daemon.cli("status").stdout
        assert f"{new.sha256[:16]} (prgenv-gnu/24.11:latest@daint%gh200 +1)  mounted" in table
        assert [Path(m.mount_point).name for m in daemon.backing_mounts()].count(
            new.sha256[:16]) == 1
    finally:
        release_holder(a)
        release_holder(b)

    # A pull moves `latest` to a new image: the link follows at the next reload.
    newer = _pulled(work, "newer", "2024-12-01", "daint", "24.11", ("v2", "latest"))
    pull(repo, newer)
    daemon.control("reload")
    wait_until(lambda: os.readlink(mp / "prgenv-gnu+24.11+latest") == newer.sha256[:16],
               what="the moved tag")
    assert (mp / "prgenv-gnu+24.11+latest" / "which").read_text() == "newer\n"
    assert (mp / "prgenv-gnu+24.11+v1" / "which").read_text() == "new\n"

    # The links the kernel knows stay links for a new server after a crash.
    daemon.expect(r"server pid \d+ was killed by SIGKILL")
    old_server = daemon.kill_server()
    wait_until(lambda: " resumed " in daemon.log() and daemon.server_pid() != old_server,
               what="a new server")
    assert os.readlink(mp / "prgenv-gnu+24.11+v1") == new.sha256[:16]
    assert (mp / "prgenv-gnu+24.11+latest" / "which").read_text() == "newer\n"
    assert os.path.islink(mp / "prgenv-gnu+24.7+v1")


def test_labels_wherever_a_name_is_taken(daemon: Daemon) -> None:
    work = daemon.root / "built"
    new = _pulled(work, "new", "2024-11-20", "daint", "24.11", ("v1", "latest"))
    old = _pulled(work, "old", "2024-07-01", "daint", "24.7", ("v1",))
    make_repository(daemon.root / "repo", [new, old])
    daemon.config = f'system = "daint"\nuarch = "gh200"\nrepos = ["{daemon.root / "repo"}"]\n'
    daemon.expect(r"control from .*: acquire prgenv-gnu job-3: failed: prgenv-gnu is ambiguous")
    daemon.expect(r"acquire prgenv-gnu/25.1 job-3: failed: no image named 'prgenv-gnu/25.1' "
                  "and no uenv label matches it")
    daemon.start()
    ids = {new.sha256[:16]: "job-1", old.sha256[:16]: "job-2"}
    for label, alloc in (("prgenv-gnu/24.11:v1@daint%gh200", "job-1"), ("prgenv-gnu/24.7", "job-2"),
                         (new.sha256, "job-4"), (old.sha256[:16], "job-5")):
        done = daemon.cli("acquire", label, alloc)
        assert done.returncode == 0, (label, done.stderr)
    acquired = {m["name"]: sorted(m["allocations"]) for m in daemon.status()["mounts"]}
    assert acquired == {new.sha256[:16]: ["job-1", "job-4"], old.sha256[:16]: ["job-2", "job-5"]}
    assert set(acquired) == set(ids)
    ambiguous = daemon.cli("acquire", "prgenv-gnu", "job-3")
    assert ambiguous.returncode == 1
    assert "Invalid argument" in ambiguous.stderr
    missing = daemon.cli("acquire", "prgenv-gnu/25.1", "job-3")
    assert (missing.returncode, "No such file or directory" in missing.stderr) == (1, True)
    # A name that is no label (+ is not a label's) is still a name: unknown is ENOENT.
    daemon.expect(r"acquire no\+such job-3: failed: no image named 'no\+such'")
    plain = daemon.cli("acquire", "no+such", "job-3")
    assert (plain.returncode, "No such file or directory" in plain.stderr) == (1, True)
    assert daemon.cli("release", "job-1", "prgenv-gnu/24.11:latest").returncode == 0
    # A path by sha256 or by a label that is one word leads to the image too.
    assert os.readlink(daemon.mountpoint / new.sha256) == new.sha256[:16]
    assert (daemon.mountpoint / new.sha256 / "which").read_text() == "new\n"
    for alloc in ("job-2", "job-4", "job-5"):
        assert daemon.cli("release", alloc).returncode == 0
    # The Slurm prolog takes labels from the job's comment.
    done = _script("prolog", daemon, 7, SLURM_JOB_COMMENT="uenv=prgenv-gnu/24.7:v1@daint")
    assert done.returncode == 0, done.stderr
    entry = daemon.mount_status(old.sha256[:16])
    assert entry is not None
    assert entry["allocations"]["slurm-7"]["acquired"] is True
    assert _script("epilog", daemon, 7).returncode == 0


def test_run_takes_labels(daemon: Daemon, mount_points: None) -> None:
    work = daemon.root / "built"
    new = _pulled(work, "new", "2024-11-20", "daint", "24.11", ("v1", "latest"))
    new = dataclasses.replace(new, meta={"env.json": json.dumps({
        "name": "prgenv-gnu", "mount": "/user-environment", "views": {"default": {"env": {
            "values": {"list": {"PATH": [{"op": "prepend",
                                          "value": ["/user-environment/bin"]}]}}}}}})})
    old = _pulled(work, "old", "2024-07-01", "daint", "24.7", ("v1",))
    make_repository(daemon.root / "repo", [new, old])
    daemon.config = f'system = "daint"\nuarch = "gh200"\nrepos = ["{daemon.root / "repo"}"]\n'
    daemon.start()

    def run(*words: str) -> subprocess.CompletedProcess[str]:  # labels: as the daemon has them
        return subprocess.run([sys.executable, "-m", "uenvfs", "run", "--mountpoint",
                               str(daemon.mountpoint), *words],
                              capture_output=True, text=True, timeout=60, check=False)

    for label, content in (("prgenv-gnu/24.11:latest", "new"), ("prgenv-gnu+24.7+v1", "old"),
                           (new.sha256[:16], "new"), ("prgenv-gnu/24.7%gh200", "old")):
        done = run(label, "--", "sh", "-c", 'cat /user-environment/which; echo "$UENV_MOUNT_LIST"')
        image = old if content == "old" else new
        assert (done.returncode, done.stdout) == (0, (
            f"{content}\n{daemon.root}/repo/images/{image.sha256}/store.squashfs:"
            "/user-environment\n")), (label, done.stderr)
    # Views from the meta/ of the repository (the image holds none).
    done = run("--view", "default", "prgenv-gnu/24.11:v1", "--", "sh", "-c", 'echo "$PATH"')
    path = ["/user-environment/bin", *os.environ["PATH"].split(":")]  # repeats go, as in uenv
    assert (done.returncode, done.stdout) == (
        0, ":".join(dict.fromkeys(p for p in path if p)) + "\n"), done.stderr
    done = run("prgenv-gnu", "--", "true")
    assert done.returncode == 125
    assert "uenvfs run: prgenv-gnu is ambiguous: it matches 2 images" in done.stderr
    done = run("prgenv-gnu/25.1", "--", "true")
    assert done.returncode == 125
    assert "no image or uenv label 'prgenv-gnu/25.1'" in done.stderr


def test_a_pull_under_way_changes_nothing(daemon: Daemon) -> None:
    """An index locked by a writer at a reload: the repository's last read stays served."""
    work = daemon.root / "built"
    new = _pulled(work, "new", "2024-11-20", "daint", "24.11", ("v1",))
    repo = make_repository(daemon.root / "repo", [new])
    daemon.config = f'system = "daint"\nuarch = "gh200"\nrepos = ["{repo}"]\n'
    daemon.expect(r"uenv repository: .*index.db: locked by a writer")
    daemon.expect(r"uenv repository .*: serving the 1 records of its last read")
    daemon.start()
    writer = sqlite3.connect(repo / "index.db", isolation_level=None)
    try:
        writer.execute("BEGIN EXCLUSIVE")
        daemon.control("reload")
        assert os.readlink(daemon.mountpoint / "prgenv-gnu+24.11+v1") == new.sha256[:16]
        assert "serving the 1 records of its last read" in daemon.log()
        writer.execute("DELETE FROM tags")
        writer.execute("COMMIT")
    finally:
        writer.close()
    daemon.control("reload")
    assert not os.path.lexists(daemon.mountpoint / "prgenv-gnu+24.11+v1")
