"""`uenvfs run` as uenv itself does it (issue 30), with a real daemon serving a repository made
as uenv's own tests make theirs (test/setup/apptool: `app/42.0:v1`, `app/43.0:v1` and
`tool/17.3.2:v1`, all `@arapiles%zen3`, with their meta/env.json), given with `--repo` and no
configuration file that names it: the command gets the environment that `uenv run` gives
(UENV_VIEW set even empty, views merged and applied as uenv applies them, nothing of Python's
own), labels are read as uenv reads them, and what uenv could not read, or a uenv session
already at the mount point, is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from uenvfs.client import exits

from ..support import Daemon, build_image, loops_for, wait_until
from ..uenv_repos import Pulled, make_repository

pytestmark = pytest.mark.fuse

SYSTEM, UARCH = "arapiles", "zen3"


def _list_view(mount: str, view: str, variable: str, path: str) -> dict[str, object]:
    return {"description": f"{view} view", "root": f"{mount}/env/{view}", "env": {
        "version": 1, "values": {"list": {variable: [{"op": "prepend", "value": [path]}]},
                                 "scalar": {}}, "type": "spack-view"}}


def _scalar_view(mount: str, description: str, scalars: dict[str, str | None]
                 ) -> dict[str, object]:
    return {"activate": "/dev/null", "description": description, "root": f"{mount}/config",
            "env": {"version": 1, "type": "augment",
                    "values": {"list": {}, "scalar": scalars}}}


def _spack(mount: str) -> dict[str, object]:
    return _scalar_view(mount, "configure spack upstream", {
        "UENV_SPACK_CONFIG_PATH": f"{mount}/config",
        "UENV_SPACK_COMMIT": "89319413d5d90caa9bea98e3419f8aeab61a2a0d",
        "UENV_SPACK_URL": "https://github.com/spack/spack.git"})


def app_meta() -> str:
    """uenv's test/setup/apptool/app42/meta/env.json (app43's is the same)."""
    mount = "/user-environment"
    return json.dumps({
        "description": "A simple app uenv for testing", "mount": mount, "name": "app",
        "views": {"app": _list_view(mount, "app", "PATH", f"{mount}/env/app/bin"),
                  "modules": _list_view(mount, "modules", "MODULEPATH", f"{mount}/modules"),
                  "spack": _spack(mount)}})


def tool_meta() -> str:
    """uenv's test/setup/apptool/tool/meta/env.json, and one view more in its form: `seen`,
    a scalar that reads PATH (which `app` changes)."""
    mount = "/user-tools"
    return json.dumps({
        "description": "A tool uenv for testing", "mount": mount, "name": "tool",
        "views": {"tool": {**_list_view(mount, "tool", "PATH", f"{mount}/env/tool/bin"),
                           "env": {"version": 1, "type": "spack-view", "values": {
                               "list": {"PATH": [{"op": "prepend",
                                                  "value": [f"{mount}/env/tool/bin"]}]},
                               "scalar": {"TOOLCONFLICT": None, "TOOLVAR": "SET"}}}},
                  "modules": _list_view(mount, "modules", "MODULEPATH", f"{mount}/modules"),
                  "spack": _spack(mount),
                  "wombat": _scalar_view(mount, "australian wildlife view",
                                         {"WOMBAT": "soup for ${@USER@}"}),
                  "seen": _scalar_view(mount, "what PATH was", {"TOOL_SEEN_PATH": "${@PATH@}"})}})


@dataclasses.dataclass
class Apptool:
    daemon: Daemon
    repo: Path
    app42: Pulled
    app43: Pulled
    tool: Pulled

    def store(self, image: Pulled) -> Path:
        return self.repo / "images" / image.sha256 / "store.squashfs"


@pytest.fixture
def apptool(daemon: Daemon, mount_points: None) -> Apptool:
    work = daemon.root / "built"
    pulled = {}
    for name, version, files, meta in (
            ("app", "42.0", {"env/app/bin/app": "#!/bin/sh\necho hello app 42\n"}, app_meta()),
            ("app", "43.0", {"env/app/bin/app": "#!/bin/sh\necho hello app 43\n"}, app_meta()),
            ("tool", "17.3.2", {"env/tool/bin/tool": "#!/bin/sh\necho hello tool\n"},
             tool_meta())):
        image = build_image(work / f"{name}{version}.sqfs", {**files, "meta/env.json": meta},
                            mode=0o755)
        pulled[version] = Pulled(image.read_bytes(), "2024-03-11 17:08:35.976000+00:00", SYSTEM,
                                 UARCH, name, version, ("v1",), {"env.json": meta})
    # uenv takes a name that starts with '_': one more label of the tool's image.
    hidden = dataclasses.replace(pulled["17.3.2"], name="_tool", version="1.0")
    repo = make_repository(daemon.root / "repo", [*pulled.values(), hidden])
    daemon.image("pe+cuda", {"bin/pe": "#!/bin/sh\necho pe\n"}, mode=0o755)
    daemon.extra_args = ["--repo", str(repo)]  # and no configuration file names it
    daemon.start()
    return Apptool(daemon, repo, pulled["42.0"], pulled["43.0"], pulled["17.3.2"])


def caller_environment(**more: str) -> dict[str, str]:
    """The test's environment as a job's: no uenv session, no locale at all (Python's own
    coercion of the C locale must not reach the command either)."""
    drop = re.compile(r"UENV_|LANG$|LANGUAGE$|LC_")
    return {**{k: v for k, v in os.environ.items() if not drop.match(k)}, **more}


def uenvfs_run(daemon: Daemon, images: str, *options: str, command: Sequence[str] = ("env",),
               environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uenvfs", "run", "--mountpoint",
                           str(daemon.mountpoint), *options, images, "--", *command],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=caller_environment() if environ is None else environ)


def env_of(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in done.stdout.splitlines())


def test_the_environment_is_uenvs(apptool: Apptool) -> None:
    # By id, which uenv takes too (labels: the next test).
    daemon, label = apptool.daemon, apptool.app42.sha256[:16]
    caller = caller_environment(PATH="/usr/bin:/x/bin:/usr/bin:/bin", USER="wombat")
    mount_list = f"{apptool.store(apptool.app42)}:/user-environment"
    # No view: UENV_VIEW is set, empty (uenv's `status` takes both variables as "in a
    # session"); nothing else changes, not even LC_CTYPE (Python's locale coercion).
    assert env_of(uenvfs_run(daemon, label, environ=caller)) == {
        **caller, "UENV_MOUNT_LIST": mount_list, "UENV_VIEW": ""}
    # A view: a later duplicate of PATH is dropped, as uenv drops it.
    got = env_of(uenvfs_run(daemon, label, "--view", "app", environ=caller))
    assert (got["PATH"], got["UENV_VIEW"]) == (
        "/user-environment/env/app/bin:/usr/bin:/x/bin:/bin", "/user-environment:app:app")
    assert "LC_CTYPE" not in got
    # Several views: every scalar before any list, so `seen` reads the caller's PATH even
    # after `app` (uenv's `tool:wombat` reads USER).
    tool = apptool.tool.sha256[:16]
    got = env_of(uenvfs_run(daemon, f"{label},{tool}", "--view",
                            "app:app,tool:seen,tool:wombat,tool", environ=caller))
    assert {k: got.get(k) for k in ("PATH", "TOOL_SEEN_PATH", "WOMBAT", "TOOLVAR",
                                    "UENV_MOUNT_LIST", "UENV_VIEW")} == {
        "PATH": "/user-tools/env/tool/bin:/user-environment/env/app/bin:/usr/bin:/x/bin:/bin",
        "TOOL_SEEN_PATH": "/usr/bin:/x/bin:/usr/bin:/bin", "WOMBAT": "soup for wombat",
        "TOOLVAR": "SET",
        "UENV_MOUNT_LIST": f"{mount_list},{apptool.store(apptool.tool)}:/user-tools",
        "UENV_VIEW": "/user-environment:app:app,/user-tools:tool:seen,/user-tools:tool:wombat,"
                     "/user-tools:tool:tool"}
    done = uenvfs_run(daemon, f"{label},{tool}", "--view", "app,tool",
                      command=["sh", "-c", "app && tool"], environ=caller)
    assert (done.returncode, done.stdout) == (0, "hello app 42\nhello tool\n"), done.stderr


def test_labels_as_uenv_writes_them(apptool: Apptool) -> None:
    daemon = apptool.daemon
    for label, image, mount in (
            (f"{apptool.app43.sha256[:16]}@{SYSTEM}", apptool.app43, "/user-environment"),
            (f"{apptool.app42.sha256}%{UARCH}", apptool.app42, "/user-environment"),
            ("app/43.0:v1@*", apptool.app43, "/user-environment"),
            ("tool@*", apptool.tool, "/user-tools"),
            ("_tool/1.0:v1", apptool.tool, "/user-tools")):
        # `uenvfs run` and `.control` read it alike: as the running daemon does.
        got = env_of(uenvfs_run(daemon, label))
        assert got["UENV_MOUNT_LIST"] == f"{apptool.store(image)}:{mount}", label
        done = daemon.cli("acquire", label, "job-1")
        assert done.returncode == 0, (label, done.stderr)
        assert daemon.cli("release", "job-1").returncode == 0
    # An ambiguous label: the candidates, as uenv lists them.
    daemon.expect(r"control from .*: acquire app@\* job-3: failed: app@\* is ambiguous")
    for done in (uenvfs_run(daemon, "app@*"), daemon.cli("acquire", "app@*", "job-3")):
        assert done.returncode in (exits.RUN_FAILED, exits.FAILED), done.stderr
        assert "app@* is ambiguous: it matches 2 images; say which with a longer label or an " \
               "id:\n  uenv         arch  system    id                size(MB)  date\n" \
               f"  app/42.0:v1  zen3  arapiles  {apptool.app42.sha256[:16]}  0         " \
               "2024-03-11\n" in done.stderr, done.stderr
    done = uenvfs_run(daemon, "app/44.0:v1")
    assert done.returncode == exits.RUN_FAILED
    assert "no image or uenv label 'app/44.0:v1'" in done.stderr


def test_image_paths_uenv_cannot_read(apptool: Apptool) -> None:
    daemon = apptool.daemon
    assert (daemon.mountpoint / "pe+cuda" / "bin" / "pe").read_text() == "#!/bin/sh\necho pe\n"
    done = uenvfs_run(daemon, "pe+cuda")
    assert done.returncode == exits.RUN_FAILED
    assert done.stderr == (
        f"uenvfs run: pe+cuda: its image file {daemon.images}/pe+cuda.sqfs cannot be given to "
        "the command in UENV_MOUNT_LIST: uenv reads only letters, digits and _ . / - in a path "
        "there, not '+'; the file or directory needs a name of those\n")


def test_a_uenv_session_at_the_mount_point(apptool: Apptool) -> None:
    """As in `uenv run app/42.0:v1`: uenv's image mounted at /user-environment in a mount
    namespace of its own, with its variables."""
    daemon, store = apptool.daemon, apptool.store(apptool.app42)
    environ = caller_environment(UENV_MOUNT_LIST=f"{store}:/user-environment",
                                 UENV_VIEW="/user-environment:app:app")

    def inside_uenv(images: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t squashfs -o ro,loop "$0" /user-environment && exec "$@"', str(store),
             sys.executable, "-m", "uenvfs", "run", "--mountpoint", str(daemon.mountpoint),
             images, "--", "sh", "-c", 'echo "$UENV_MOUNT_LIST"'],
            capture_output=True, text=True, timeout=60, check=False, env=environ)

    app43, tool = apptool.app43.sha256[:16], apptool.tool.sha256[:16]
    done = inside_uenv(app43)
    assert done.returncode == exits.RUN_FAILED, done.stderr
    assert re.fullmatch(
        r"uenvfs run: /user-environment already holds a squashfs mount of /dev/loop\d+ \("
        + re.escape(f"{store} in UENV_MOUNT_LIST), which uenvfs did not put there: a uenv "
                    "session (uenv start or uenv run) is running; leave it first, or put ")
        + r"\w+ elsewhere with \w+:MOUNT\n", done.stderr), done.stderr
    # Another mount point is free: the image is added there.
    done = inside_uenv(tool)
    assert (done.returncode, done.stdout) == (
        0, f"{store}:/user-environment,{apptool.store(apptool.tool)}:/user-tools\n"), done.stderr
    # UENV_MOUNT_LIST alone (passed on by Slurm from another node) is no mount here.
    got = env_of(uenvfs_run(daemon, app43, environ=environ))
    assert (got["UENV_MOUNT_LIST"], got["UENV_VIEW"]) == (
        f"{apptool.store(apptool.app43)}:/user-environment", "")
    wait_until(lambda: not [d for d in loops_for(apptool.repo)
                            if d not in _daemons_loops(daemon)],
               what="the loop device of uenv's mount to go")


def _daemons_loops(daemon: Daemon) -> set[str]:
    """The loop devices of the daemon's own mounts."""
    return {entry.source for entry in daemon.backing_mounts()}
