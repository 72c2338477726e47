"""`uenvfs run` and `uenvfs start` with a real daemon: software built for /user-environment
runs there, as root and as an unprivileged user, counted for the caller's allocation.

The images are built here: a C program linked with `-Wl,-rpath,/user-environment/lib` against
a shared library inside the image, a script whose `#!` names an interpreter inside the image,
and a view of meta/env.json. /user-environment and /user-tools are created for the test if
the machine has none (and removed after); nothing is ever mounted on them outside the
namespaces of the commands under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from uenvfs.client import exits

from ..conftest import DaemonFactory
from ..mounts import is_mounted
from ..support import Daemon, wait_until
from ..uenv_images import greet_files, meta_json

pytestmark = pytest.mark.fuse

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
USERS = {"root": [], "nobody": NOBODY}
def python_for_nobody() -> tuple[str, dict[str, str]]:
    """A Python that nobody can run inside its user namespace (where root's 0700 home, which
    may hold the test's interpreter, cannot be crossed), with what it needs to import uenvfs."""
    repo = str(Path(__file__).resolve().parents[2])
    for python, env in ((sys.executable, {}), ("/usr/bin/python3", {"PYTHONPATH": repo})):
        done = subprocess.run([*NOBODY, "unshare", "--user", "--map-current-user", "sh", "-c",
                               'exec "$0" -c "import uenvfs.client.run"', python],
                              env={**os.environ, **env}, capture_output=True, check=False,
                              timeout=60)
        if done.returncode == 0:
            return python, env
    pytest.fail(f"nobody can run neither {sys.executable} nor /usr/bin/python3 with uenvfs")


@pytest.fixture
def served(daemon: Daemon, mount_points: None) -> Daemon:
    """A daemon serving `greet` (built for /user-environment) and `tools` (/user-tools)."""
    work = daemon.root / "cc"
    work.mkdir()
    files: dict[str, bytes | str] = {
        **greet_files(work),
    }
    daemon.image("greet", files, mode=0o755)
    daemon.image("tools", {"bin/tool": "#!/bin/sh\necho tool here\n",
                           "meta/env.json": meta_json("tools-env", "/user-tools", "tools")},
                 mode=0o755)
    daemon.image("plain", {"bin/plain": "#!/bin/sh\necho plain\n"}, mode=0o755)
    daemon.start()
    return daemon


def uenvfs(daemon: Daemon, *args: str, user: Sequence[str] = (), cwd: Path | str = "/",
           env: dict[str, str] | None = None, command: Sequence[str] = (),
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`uenvfs ARGS [--mountpoint ...] [-- COMMAND]` as *user*, as a job would run it."""
    full = [*user, sys.executable, "-m", "uenvfs", *args, "--mountpoint", str(daemon.mountpoint)]
    if command:
        full += ["--", *command]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("UENV")}
    return subprocess.run(full, capture_output=True, text=True, cwd=cwd, timeout=60,
                          check=False, env={**environ, **(env or {})}, input=stdin)


@pytest.mark.parametrize("user", USERS)
def test_software_built_for_its_mount_point_runs(served: Daemon, user: str) -> None:
    who = USERS[user]
    served_at = served.mountpoint / "greet"
    # Served at MOUNTPOINT/greet, what has /user-environment compiled in does not run.
    direct = subprocess.run([*who, "sh", "-c", str(served_at / "bin/greet")], capture_output=True,
                            text=True, check=False, timeout=60)
    assert direct.returncode == 127
    assert "libgreet.so: cannot open shared object file" in direct.stderr
    script = subprocess.run([*who, "sh", "-c", str(served_at / "bin/hello")],
                            capture_output=True, text=True, check=False, timeout=60)
    assert script.returncode == 127  # its interpreter, /user-environment/bin/interp: not found
    assert script.stdout == ""

    done = uenvfs(served, "run", "greet", user=who,
                  command=["/user-environment/bin/greet"])
    assert (done.returncode, done.stdout) == (0, "hello from libgreet\n"), done.stderr
    done = uenvfs(served, "run", "greet", user=who, command=["/user-environment/bin/hello"])
    assert (done.returncode, done.stdout) == (0, "script run by /user-environment/bin/hello\n"
                                              ), done.stderr

    # The view: the image's own paths, and uenv's variables.
    shown = ('greet; echo "$DEFAULT_HOME"; echo "$UENV_MOUNT_LIST"; echo "$UENV_VIEW"; '
             'echo "$PATH"; id -u')
    done = uenvfs(served, "run", "--view", "default", "greet", user=who,
                  command=["sh", "-c", shown], env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "hello from libgreet", "/user-environment",
        f"{served.images / 'greet.sqfs'}:/user-environment",
        "/user-environment:greet-env:default",
        "/user-environment/bin:/usr/bin:/bin",
        "0" if user == "root" else "65534"]
    # Nothing of it reached the host.
    assert not is_mounted(Path("/user-environment"))
    assert os.listdir("/user-environment") == []


def test_exit_codes_and_working_directory(served: Daemon, world_tmp: Path) -> None:
    work = world_tmp / "work dir"
    work.mkdir()
    done = uenvfs(served, "run", "greet", user=NOBODY, cwd=work,
                  command=["sh", "-c", "pwd; exit 7"])
    assert (done.returncode, done.stdout) == (7, f"{work}\n")
    done = uenvfs(served, "run", "greet", command=["no-such-command"])
    assert done.returncode == exits.NOT_FOUND
    assert "no-such-command: command not found" in done.stderr
    done = uenvfs(served, "run", "greet", command=["/user-environment/share/data.txt"])
    assert done.returncode == exits.CANNOT_EXECUTE
    assert "Permission denied" in done.stderr or "Exec format error" in done.stderr
    # The same groups: a file readable only through a supplementary group stays readable
    # (the kernel keeps the groups; inside, `id` shows them as nogroup).
    secret = world_tmp / "group-secret"
    secret.write_text("for group 6\n")
    os.chown(secret, 0, 6)
    secret.chmod(0o640)
    in_group = ["setpriv", "--reuid=65534", "--regid=65534", "--groups=6"]
    done = uenvfs(served, "run", "greet", user=in_group, command=["cat", str(secret)])
    assert (done.returncode, done.stdout) == (0, "for group 6\n"), done.stderr
    done = uenvfs(served, "run", "greet", user=NOBODY, command=["cat", str(secret)])
    assert done.returncode == 1
    assert "Permission denied" in done.stderr
    # A working directory inside the image's mount point is found again in the image.
    done = uenvfs(served, "run", "greet", cwd="/user-environment", command=["ls"])
    assert done.stdout.split() == ["bin", "lib", "meta", "share"]


@pytest.mark.parametrize("user", USERS)
def test_two_images_at_two_mount_points(served: Daemon, user: str) -> None:
    done = uenvfs(served, "run", "--view", "default,tools-env:tools", "greet,tools",
                  user=USERS[user], command=["sh", "-c", "greet && tool && echo $UENV_VIEW"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "hello from libgreet", "tool here",
        "/user-environment:greet-env:default,/user-tools:tools-env:tools"]
    # An explicit mount point; an image without meta/env.json goes to /user-environment.
    done = uenvfs(served, "run", "tools:/user-environment,plain:/user-tools", user=USERS[user],
                  command=["sh", "-c", "/user-environment/bin/tool; /user-tools/bin/plain; "
                           "echo $UENV_MOUNT_LIST"])
    assert done.stdout.splitlines() == [
        "tool here", "plain", f"{served.images}/tools.sqfs:/user-environment,"
        f"{served.images}/plain.sqfs:/user-tools"], done.stderr
    done = uenvfs(served, "run", "plain", command=["/user-environment/bin/plain"])
    assert done.stdout == "plain\n", done.stderr


def test_uses_count_for_the_callers_allocation(served: Daemon) -> None:
    # job-42 is nobody's (a prolog's `acquire NAME ALLOC UID` says so): only then may nobody's
    # environment name it.
    served.control("acquire plain job-42 65534")
    python, env = python_for_nobody()
    job = subprocess.Popen(
        [*NOBODY, sys.executable, "-m", "uenvfs", "run", "greet", "--mountpoint",
         str(served.mountpoint), "--", "sh", "-c",
         "exec 3</user-environment/lib/libgreet.so; cd /user-environment/bin; "
         f"{python} -m uenvfs status --mountpoint {served.mountpoint}; "
         "echo ready; read x || true"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env, "PACT_ALLOCATION_ID": "job-42"})
    assert job.stdout is not None
    assert job.stdin is not None
    assert job.stderr is not None
    try:
        lines: list[str] = []
        while not lines or lines[-1] != "ready":
            line = job.stdout.readline()
            assert line, f"the job ended: {job.stderr.read()}"
            lines.append(line.strip())
        assert "this process sees greet at /user-environment (views applied: none)" in lines
        # The job's open file and working directory are in the image's kernel mount: they
        # never reach uenvfs. The job's allocation uses the image through its namespace.
        wait_until(lambda: (served.mount_status("greet") or {}).get("allocations", {}).get(
            "job-42") == {"opens": 0, "acquired": False, "cwd": 0, "namespaces": 1},
            what="job-42's namespace in .status")
        verify = served.cli("status", "--verify")
        assert verify.returncode == 0, verify.stdout
    finally:
        job.stdin.close()
        job.wait(60)
        job.stdout.close()
        job.stderr.close()
    assert job.returncode == 0
    wait_until(lambda: "job-42" not in (served.mount_status("greet") or {}).get(
        "allocations", {}), what="job-42 to end its uses")
    served.control("release job-42")


def test_clear_errors_and_nothing_done(served: Daemon, world_tmp: Path) -> None:
    cases = [
        (["run", "nosuch"], "no image 'nosuch' (uenvfs at"),
        (["run", "greet:/no/such/dir"], "mount point /no/such/dir does not exist: root must "
                                         "create it (mkdir /no/such/dir), or choose another"),
        (["run", "greet,tools:/user-environment"],
         "greet and tools both want mount point /user-environment"),
        (["run", "--view", "nope", "greet"], "no view 'nope': greet has default"),
        (["run", "--view", "default", "plain"], "no view 'default': plain has no meta/env.json"),
        (["run", f"greet:{served.mountpoint}/x"], "would hide uenvfs"),
    ]
    for args, message in cases:
        done = uenvfs(served, *args, user=NOBODY, command=["true"])
        assert done.returncode == exits.RUN_FAILED, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    assert "serves: greet, plain, tools" in uenvfs(served, "run", "nosuch",
                                                    command=["true"]).stderr
    empty = world_tmp / "nothing-here"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "uenvfs", "run", "greet", "--mountpoint",
                           str(empty), "--", "true"], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == exits.RUN_FAILED
    assert f"no uenvfs serving at {empty}" in done.stderr
    done = uenvfs(served, "run", "--bogus", "greet", command=["true"])
    assert done.returncode == exits.RUN_FAILED
    # attach (for the SPANK plugin) never binds in the namespace where uenvfs serves.
    served.control("acquire greet job-1")
    done = uenvfs(served, "attach", "job-1")
    assert done.returncode == exits.RUN_FAILED
    assert "this is the one uenvfs serves in: only the SPANK plugin" in done.stderr
    assert not is_mounted(Path("/user-environment"))
    served.control("release job-1")


USERNS_OFF = textwrap.dedent("""\
    # In a user namespace of its own, where root may set the limit: no more user namespaces
    # below it. Then, as nobody, what is asked for.
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    go, ready = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        assert libc.unshare(0x10000000) == 0, os.strerror(ctypes.get_errno())
        os.write(ready[1], b"x")
        os.read(go[0], 1)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        with open("/proc/sys/user/max_user_namespaces", "w") as limit:
            limit.write("0")
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        os.execv(sys.argv[1], sys.argv[1:])
    os.read(ready[0], 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as ids:
            ids.write("0 0 1\\n65534 65534 1\\n")
    os.write(go[1], b"x")
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
""")


def test_user_namespaces_turned_off(served: Daemon, world_tmp: Path) -> None:
    helper = world_tmp / "userns_off.py"
    helper.write_text(USERNS_OFF)
    python, env = python_for_nobody()
    done = subprocess.run([sys.executable, str(helper), python, "-m", "uenvfs", "run", "greet",
                           "--mountpoint", str(served.mountpoint), "--", "true"],
                          capture_output=True, text=True, check=False, timeout=60,
                          env={**os.environ, **env})
    assert done.returncode == exits.RUN_FAILED, done.stderr
    assert "cannot create a user namespace: No space left on device (ENOSPC)" in done.stderr
    assert "user.max_user_namespaces = 0 (this refuses them)" in done.stderr


def test_start_nested_runs_and_a_crash(make_daemon: DaemonFactory, mount_points: None) -> None:
    daemon = make_daemon()
    daemon.image("greet", {"share/data.txt": "data of greet\n",
                           "meta/env.json": meta_json("greet-env", "/user-environment", "default")})
    daemon.image("tools", {"bin/tool": "#!/bin/sh\necho tool here\n",
                           "meta/env.json": meta_json("tools-env", "/user-tools", "tools")},
                 mode=0o755)
    daemon.start()
    daemon.control("acquire tools job-7 65534")  # nobody's allocation, as a prolog says
    python, env = python_for_nobody()
    shell = subprocess.Popen(
        [*NOBODY, sys.executable, "-m", "uenvfs", "start", "greet", "--view", "default",
         "--mountpoint", str(daemon.mountpoint)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env, "SHELL": "/bin/sh", "PACT_ALLOCATION_ID": "job-7"}, bufsize=1)
    assert shell.stdin is not None
    assert shell.stdout is not None
    assert shell.stderr is not None
    uenvfs = f"{python} -m uenvfs"
    mp = f"--mountpoint {daemon.mountpoint}"

    def say(line: str) -> list[str]:
        assert shell.stdin is not None
        assert shell.stdout is not None
        shell.stdin.write(f"{line}; echo END\n")
        out = []
        while (got := shell.stdout.readline()) != "END\n":
            assert got, "the shell ended"
            out.append(got.rstrip("\n"))
        return out

    try:
        assert say("cat /user-environment/share/data.txt; echo $DEFAULT_HOME") == [
            "data of greet", "/user-environment"]
        # The image's kernel mount, the very one uenvfs mounted.
        assert say("stat -f -c %T /user-environment; stat -c %d /user-environment") == [
            "squashfs", str(os.stat(daemon.backing_root / "greet").st_dev)]
        # A run inside the start adds an image; the same image again is no change; another
        # image on a taken mount point is refused, saying why.
        listed = "sh -c '/user-tools/bin/tool; echo $UENV_MOUNT_LIST'"
        assert say(f"{uenvfs} run tools {mp} -- {listed}") == [
            "tool here", f"{daemon.images}/greet.sqfs:/user-environment,"
                         f"{daemon.images}/tools.sqfs:/user-tools"]
        assert say(f"{uenvfs} run greet {mp} -- cat /user-environment/share/data.txt") == [
            "data of greet"]
        assert say(f"{uenvfs} run tools:/user-environment {mp} -- true; echo $?") == [
            str(exits.RUN_FAILED)]
        assert say(f"{uenvfs} status {mp} | tail -1") == [
            "this process sees greet at /user-environment (views applied: default)"]
        # The session does not notice a crash of the server, and the new server knows the
        # session's binds as the old one did.
        assert say("cd /user-environment/share") == []
        daemon.expect(r"server pid \d+ was killed by SIGKILL")
        old = daemon.kill_server()
        wait_until(lambda: " resumed " in daemon.log() and daemon.server_pid() != old,
                   what="a new server")
        assert say("cat data.txt; cat /user-environment/share/data.txt") == [
            "data of greet", "data of greet"]
        assert say(f"{uenvfs} status {mp} | tail -1") == [
            "this process sees greet at /user-environment (views applied: default)"]
    finally:
        shell.stdin.close()
        shell.wait(60)
        errors = shell.stderr.read()
        shell.stdout.close()
        shell.stderr.close()
    assert "/user-environment already holds image greet (from an enclosing uenvfs run or " \
           "start); put tools elsewhere" in errors
    assert shell.returncode == 0, errors
    daemon.control("release job-7")
