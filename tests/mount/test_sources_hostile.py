"""Attacks of issue 27 on how uenvfs starts and on its image sources, through a real daemon,
by `nobody`: a module planted in the directory `serve` was started from never runs; a
hostile index.db is refused record by record and read within bounds; the program map is
never given an option. Each test failed before its fix."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import DaemonFactory
from ..support import Daemon, build_image, wait_until
from ..uenv_repos import RECORDS, Pulled, make_repository

pytestmark = pytest.mark.fuse

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
SYSTEM_PYTHON = "/usr/bin/python3"  # one that nobody can run


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SETPRIV, *command], capture_output=True, text=True, timeout=60,
                          cwd="/")


def give_to_nobody(path: Path) -> None:
    """*path* and all below it belong to nobody."""
    os.chown(path, NOBODY, NOBODY)
    for directory, subdirectories, files in os.walk(path):
        for name in subdirectories + files:
            os.chown(os.path.join(directory, name), NOBODY, NOBODY)


def listing(directory: Path) -> list[str]:
    """What nobody lists in *directory* (no dot files); fails the test if it cannot."""
    out = as_nobody("ls", "-1", str(directory))
    assert out.returncode == 0, out.stderr
    return sorted(out.stdout.split())


def vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key}")


def serving_other_than(daemon: Daemon, old: int) -> bool:
    try:
        return daemon.server_pid() != old
    except OSError:
        return False


# -- attack 1: code in the working directory -------------------------------------------------

PLANTED = """import os, sys
with open({marker!r}, "a") as f:
    f.write(f"{{os.getuid()}} {{sys.argv}}\\n")
"""


def test_nothing_runs_from_the_working_directory(make_daemon: DaemonFactory,
                                                 world_tmp: Path) -> None:
    """`serve` started in a directory where nobody left a `uenvfs` module and package: not
    a server, not a server after a crash, not the keeper of a restart, not a keeper started
    by a server whose keeper died runs them (Python puts the working directory of `-m`
    first on the import path)."""
    marker = world_tmp / "planted-code-ran"
    hostile = world_tmp / "cwd"
    (hostile / "uenvfs").mkdir(parents=True)
    (hostile / "uenvfs.py").write_text(PLANTED.format(marker=str(marker)))
    (hostile / "uenvfs" / "__init__.py").write_text(PLANTED.format(marker=str(marker)))
    give_to_nobody(hostile)
    daemon = make_daemon(cwd=hostile)
    daemon.image("img", {"f": "served"})
    daemon.expect(r"keeper: server pid \d+ was killed by SIGKILL")
    daemon.expect(r"the keeper died: starting another")
    daemon.expect(r"keeper: server pid \d+ exited \(status unknown: not our child\)")
    daemon.start()
    assert daemon.process is not None
    f = daemon.mountpoint / "img/f"
    assert f.read_text() == "served"
    # A crash: the keeper starts a new server.
    server = daemon.kill_server()
    wait_until(lambda: serving_other_than(daemon, server), what="a new server")
    assert f.read_text() == "served"
    # `uenvfs restart`: the keeper runs the installed keeper (exec), which starts a server.
    server = daemon.server_pid()
    out = daemon.cli("restart")
    assert out.returncode == 0, out.stderr
    assert serving_other_than(daemon, server)
    assert f.read_text() == "served"
    # The keeper dies: the server starts a keeper, which starts the next server.
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait()
    wait_until(lambda: len(daemon.processes_left()) == 2, what="a new keeper")
    server = daemon.kill_server()
    wait_until(lambda: serving_other_than(daemon, server), what="a new server")
    assert f.read_text() == "served"
    assert not marker.exists(), marker.read_text()
    (keeper,) = [pid for pid in daemon.processes_left()
                 if b"uenvfs.keeper" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(keeper, signal.SIGTERM)
    wait_until(lambda: not daemon.processes_left(), what="the keeper and its server to stop")
    assert not marker.exists(), marker.read_text()


# -- attack 7: a hostile index.db -------------------------------------------------------------

def nobody_writes_records(repo: Path, select: str) -> None:
    """nobody (who may write *repo*) makes its view `records` `select`."""
    script = ("import sqlite3, sys\n"
              "db = sqlite3.connect(sys.argv[1])\n"
              "with db:\n"
              "    db.execute('DROP VIEW records')\n"
              "    db.execute('CREATE VIEW records AS ' + sys.argv[2])\n"
              "db.close()\n")
    out = as_nobody(SYSTEM_PYTHON, "-I", "-c", script, str(repo / "index.db"), select)
    assert out.returncode == 0, out.stderr


def hostile_row(sha256: str, id_: str, name: str = "evil", tag: str = "v1") -> str:
    return (f"SELECT 'daint' AS system, 'gh200' AS uarch, '{name}' AS name, '1.0' AS version, "
            f"'{tag}' AS tag, '2024-12-01' AS date, 1 AS size, '{sha256}' AS sha256, "
            f"'{id_}' AS id")


def served_repository(daemon: Daemon) -> tuple[Path, Pulled]:
    """A repository of one image, prgenv-gnu/24.11:v1, that nobody may write, served by
    *daemon* (not started yet) for the system daint%gh200."""
    image = build_image(daemon.root / "built" / "good.sqfs", {"which": "good\n"})
    good = Pulled(image.read_bytes(), "2024-11-20", "daint", "gh200", "prgenv-gnu", "24.11",
                  ("v1",))
    repo = make_repository(daemon.root / "repo", [good])
    give_to_nobody(repo)
    daemon.extra_args = ["--repo", str(repo)]
    daemon.config = 'system = "daint"\nuarch = "gh200"\n'
    return repo, good


def test_records_outside_uenvs_characters_are_refused(daemon: Daemon) -> None:
    repo, good = served_repository(daemon)
    sha, id_ = good.sha256, good.sha256[:16]
    nobody_writes_records(repo, " UNION ALL ".join([
        RECORDS,
        hostile_row(sha, "0123456789/abcde"),  # made every listing of the root fail (EIO)
        hostile_row(sha, id_, tag="v1:x,y"),  # was served as prgenv-gnu+...
        hostile_row(sha, id_, name="a,b")]))
    index = repo / "index.db"
    daemon.expect(rf"uenv repository: {index}: row 2 \(sha256 {sha}\): not served, "
                  r"bad id '0123456789/abcde'")
    daemon.expect(rf"uenv repository: {index}: row 3 \(sha256 {sha}\): not served, "
                  r"bad tag 'v1:x,y'")
    daemon.expect(rf"uenv repository: {index}: row 4 \(sha256 {sha}\): not served, "
                  r"bad name 'a,b'")
    daemon.start()
    mp = daemon.mountpoint
    assert listing(mp) == sorted([id_, "prgenv-gnu+24.11+v1"])
    assert (mp / "prgenv-gnu+24.11+v1" / "which").read_text() == "good\n"
    for name in ("prgenv-gnu+24.11+v1:x,y", "a,b+1.0+v1"):
        assert as_nobody("stat", str(mp / name)).returncode != 0, name
    assert daemon.cli("reload").returncode == 0
    assert listing(mp) == sorted([id_, "prgenv-gnu+24.11+v1"])


# rows that never end, each a record of the good image (so each one is kept, until the bound)
ENDLESS = ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
           "SELECT 'daint' AS system, 'gh200' AS uarch, 'endless' || n AS name, '1.0' AS "
           "version, 'v' || n AS tag, '2024-12-01' AS date, 1 AS size, '{sha}' AS sha256, "
           "'{id}' AS id FROM r")
# no row ever, while SQLite's memory grows (UNION keeps every row it saw, a kilobyte each)
GROWING = ("WITH RECURSIVE r(n, pad) AS (SELECT 1, zeroblob(1000) UNION SELECT n + 1, pad "
           "FROM r) SELECT 'daint' AS system, 'gh200' AS uarch, 'x' AS name, '1' AS version, "
           "'v' AS tag, '' AS date, 1 AS size, '{sha}' AS sha256, '{id}' AS id FROM r "
           "WHERE n < 0")
# no row ever, in constant memory: SQLite counts until the time bound
SILENT = GROWING.replace("r(n, pad) AS (SELECT 1, zeroblob(1000) UNION SELECT n + 1, pad",
                         "r(n) AS (SELECT 1 UNION ALL SELECT n + 1")


def test_an_index_that_never_ends(make_daemon: DaemonFactory) -> None:
    """`reload` answers within the source timeout, with the repository's problem in the
    log and its last read served; the server's memory stays bounded; a server started on
    such an index (after a crash, or at the next start) serves."""
    daemon = make_daemon()
    repo, good = served_repository(daemon)
    daemon.config += "mount_timeout = 3\n"
    index, id_ = repo / "index.db", good.sha256[:16]
    daemon.expect(rf"uenv repository: {index}: more than 100000 records: not read")
    daemon.expect(rf"uenv repository: {index}: (reading it takes more than 32 MiB|no answer "
                  r"within 2.\d+ s \(a records view that does not end\?\)): not read")
    daemon.expect(rf"uenv repository {repo}: serving the 1 records of its last read")
    daemon.expect(r"keeper: server pid \d+ was killed by SIGKILL")
    daemon.start()
    mp = daemon.mountpoint
    assert listing(mp) == sorted([id_, "prgenv-gnu+24.11+v1"])
    server = daemon.server_pid()
    peak = vm_kib(server, "VmHWM")
    for view in (ENDLESS, GROWING, SILENT):
        nobody_writes_records(repo, view.format(sha=good.sha256, id=id_))
        started = time.monotonic()
        daemon.control("reload")  # answered: the listing of the last read applied
        assert time.monotonic() - started < 3.0
        assert listing(mp) == sorted([id_, "prgenv-gnu+24.11+v1"])  # its last read
        assert (mp / id_ / "which").read_text() == "good\n"
        assert vm_kib(server, "VmHWM") - peak < 64 << 10, view  # KiB: twice SQLite's 32 MiB
    # A new server reads the index at its start, within the time bound, and serves.
    daemon.kill_server()
    wait_until(lambda: serving_other_than(daemon, server), what="a new server")
    assert listing(mp) == []  # a new server has no last read of the repository
    assert daemon.stop() == 0
    daemon.start()
    assert daemon.status()["server"]["resumes"] == 0
    assert listing(mp) == []


# -- attack 8: the program map ---------------------------------------------------------------

def test_the_program_map_is_never_given_an_option(daemon: Daemon) -> None:
    """A name that starts with '-' does not exist, and the program map is not asked."""
    program = daemon.root / "lookup"
    program.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$0.args"\nexit 1\n')
    program.chmod(0o755)
    daemon.extra_args = ["--program-map", str(program)]
    daemon.start()
    for name in ("-x", "--help", "-", "--", "--version=1", "plain"):
        out = as_nobody("stat", str(daemon.mountpoint / name))
        assert out.returncode == 1, name
        assert os.strerror(errno.ENOENT) in out.stderr, name
    assert (daemon.root / "lookup.args").read_text() == "plain\n"
