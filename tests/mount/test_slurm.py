"""The Slurm prolog and epilog (scripts/slurm) with a real daemon, and under a real Slurm.

The Slurm here is private to the test: its own munged (a fresh key, its socket in the scratch
directory), slurmctld and slurmd in the foreground on free ports, as root, with a one-node
slurm.conf whose Prolog and Epilog are this repository's scripts behind a wrapper that points
them at the test's daemon. Nothing of a Slurm or munge installed on the machine is used.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..mounts import is_mounted
from ..support import Daemon, build_image, wait_until
from ..uenv_images import greet_files, meta_json
from ..uenv_repos import Pulled, make_repository

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "slurm"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol",
               "scancel")
MISSING = [tool for tool in SLURM_TOOLS if shutil.which(tool, path=SBIN_PATH) is None]
SLURM_REASON = (f"needs Slurm and munge (apt-get install slurmctld slurmd slurm-client munge): "
                f"{', '.join(MISSING)} not found" if MISSING else None)
START_DEADLINE = 60.0
SPANK_TIMEOUT = 5.0  # the SPANK plugin's timeout= here: uenvfs attach is killed after it

pytestmark = pytest.mark.fuse


def _hello(daemon: Daemon) -> None:
    daemon.image("hello", {"bin/hello": "#!/bin/sh\necho hi\n"}, mode=0o755)
    daemon.start()


def _allocations(daemon: Daemon) -> dict[str, dict[str, object]]:
    """Every allocation of every mounted image, as `.status` lists it: {alloc: {image: info}}."""
    found: dict[str, dict[str, object]] = {}
    for mount in daemon.status()["mounts"]:
        for alloc, info in mount["allocations"].items():
            found.setdefault(alloc, {})[mount["name"]] = info
    return found


def _uenvfs_command(directory: Path) -> Path:
    """`uenvfs` for the scripts: this test's Python, as the daemon runs it."""
    path = directory / "uenvfs"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -m uenvfs "$@"\n')
    path.chmod(0o755)
    return path


# -- the scripts alone, as slurmd would run them -------------------------------------------


def _script(name: str, daemon: Daemon, job: int, **env: str) -> subprocess.CompletedProcess[str]:
    """Run scripts/slurm/NAME with the environment that slurmd gives it (no PATH)."""
    base = {"SLURM_JOB_ID": str(job), "SLURM_JOBID": str(job), "SLURM_SCRIPT_CONTEXT":
            f"{name}_slurmd", "UENVFS_MOUNTPOINT": str(daemon.mountpoint),
            "UENVFS": str(_uenvfs_command(daemon.root))}
    return subprocess.run([str(SCRIPTS / name)], env={**base, **env}, capture_output=True,
                          text=True, timeout=120, check=False)


def test_prolog_acquires_from_comment_and_spank(daemon: Daemon) -> None:
    daemon.image("other", {"f": "x"})
    _hello(daemon)
    done = _script("prolog", daemon, 41, SLURM_JOB_COMMENT="x=1 uenv=hello y=2",
                   SPANK_UENVFS_IMAGES="other,hello")
    assert done.returncode == 0, done.stderr
    assert _allocations(daemon)["slurm-41"] == {
        "hello": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0},
        "other": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
    done = _script("epilog", daemon, 41)
    assert done.returncode == 0, done.stderr
    assert "slurm-41" not in _allocations(daemon)


def test_prolog_policy_for_unknown_images(daemon: Daemon) -> None:
    _hello(daemon)
    daemon.expect(r"acquire nosuch slurm-4[23]( \d+)?: failed")
    # An unknown name and names that are not names: logged, the job runs.
    comment = "uenv=nosuch,--mountpoint=/tmp,../x,hello"
    done = _script("prolog", daemon, 42, SLURM_JOB_COMMENT=comment)
    assert done.returncode == 0, done.stderr
    assert "cannot acquire nosuch" in done.stderr
    assert "'--mountpoint=/tmp' is not an image name" in done.stderr
    assert "'../x' is not an image name" in done.stderr
    assert _allocations(daemon)["slurm-42"] == {
        "hello": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
    # UENVFS_STRICT=1: the same failure fails the prolog (what it acquired stays acquired:
    # Slurm runs the epilog after a failed prolog).
    done = _script("prolog", daemon, 43, SLURM_JOB_COMMENT="uenv=hello,nosuch",
                   UENVFS_STRICT="1")
    assert done.returncode == 1
    assert "UENVFS_STRICT=1" in done.stderr
    for job in (42, 43):
        assert _script("epilog", daemon, job).returncode == 0
    assert _allocations(daemon) == {}


def test_scripts_without_images_or_daemon(daemon: Daemon) -> None:
    _hello(daemon)
    # A job that asks for nothing: nothing happens, and the daemon is not even asked.
    assert _script("prolog", daemon, 44).returncode == 0
    done = _script("epilog", daemon, 44)
    assert (done.returncode, done.stderr) == (0, "")
    assert "slurm-44" not in daemon.log()
    # No uenvfs at the mountpoint: a job that needs it cannot run on this node.
    elsewhere = {"UENVFS_MOUNTPOINT": str(daemon.root / "nothing-here")}
    done = _script("prolog", daemon, 45, SLURM_JOB_COMMENT="uenv=hello", **elsewhere)
    assert done.returncode == 1
    assert "uenvfs does not answer (exit 3)" in done.stderr
    # ... but the epilog does not drain the node for it.
    done = _script("epilog", daemon, 45, **elsewhere)
    assert done.returncode == 0
    assert "cannot release slurm-45 (exit 3)" in done.stderr


# -- a real Slurm ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Slurm:
    """A one-node Slurm on localhost, its files in *root*; `start()` runs it, `stop()` ends it."""

    root: Path
    mountpoint: Path
    plugstack: str = ""  # the lines of a plugstack.conf, if any
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        # Nothing of the test's own environment (it may run inside a Slurm job itself).
        return {"PATH": SBIN_PATH, "SLURM_CONF": str(self.conf), "LC_ALL": "C"}

    def _wrapper(self, name: str) -> Path:
        path = self.root / name
        path.write_text(f"#!/bin/sh\nexport UENVFS_MOUNTPOINT={self.mountpoint}\n"
                        f"export UENVFS={_uenvfs_command(self.root)}\n"
                        f"exec {SCRIPTS / name} 2>>{self.root / name}.log\n")
        path.chmod(0o755)
        return path

    def _configure(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o755)  # munged: the socket's directories must be searchable by all
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))  # a key of its own: never the machine's
        key.chmod(0o600)
        for name in ("state", "spool"):
            (self.root / name).mkdir()
        r = self.root
        plugstack = ""
        if self.plugstack:
            (r / "plugstack.conf").write_text(self.plugstack)
            plugstack = f"PlugStackConfig={r / 'plugstack.conf'}\n"
        self.conf.write_text(plugstack + f"""\
ClusterName=uenvfstest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge / "munge.sock"}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
SlurmdLogFile={r / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
Prolog={self._wrapper("prolog")}
Epilog={self._wrapper("epilog")}
PrologFlags=Alloc
PrologEpilogTimeout=120
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, *command: str) -> None:
        with (self.root / f"{name}.out").open("wb") as out:
            self.processes[name] = subprocess.Popen(
                [shutil.which(command[0], path=SBIN_PATH) or command[0], *command[1:]],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env)

    def start(self) -> Slurm:
        self._configure()
        munge = self.root / "munge"
        self._spawn("munged", "munged", "--foreground", f"--socket={munge / 'munge.sock'}",
                    f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                    f"--seed-file={munge / 'munged.seed'}", f"--log-file={munge / 'munged.log'}")
        self._wait(lambda: (munge / "munge.sock").exists(), "munged's socket")
        self._spawn("slurmctld", "slurmctld", "-D")
        self._spawn("slurmd", "slurmd", "-D", "-N", self.node)
        self._wait(lambda: self.node_state() == "idle", f"node {self.node} to be idle")
        return self

    def _wait(self, predicate: Callable[[], object], what: str) -> None:
        def ready() -> object:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited {process.returncode}\n{self.logs()}")
            return predicate()

        try:
            wait_until(ready, timeout=START_DEADLINE, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def run(self, *command: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=60, check=False)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr}")
        return done.stdout

    def node_state(self) -> str:
        """sinfo's short state of the node ("idle", "drain", ...), "" while nobody answers."""
        done = subprocess.run(["sinfo", "-h", "-n", self.node, "-o", "%t"], capture_output=True,
                              text=True, env=self.env, timeout=60, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> int:
        """Submit a job (with *env* in its environment too); its id."""
        return int(self.run("sbatch", "--parsable", f"--chdir={self.root}",
                            f"--output={self.root}/job-%j.out", *args, env=env).split(";")[0])

    def state(self, job: int) -> str:
        """The job's state as squeue shows it; "" once it is gone (its epilog finished)."""
        return self.run("squeue", "-h", "-j", str(job), "-o", "%T").strip()

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log", "prolog.log",
                     "epilog.log"):
            path = self.root / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- {name} (end):\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> list[str]:
        """Cancel every job, then stop slurmd, slurmctld and munged. Returns what went wrong."""
        problems = []
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            try:
                jobs = self.run("squeue", "-h", "-o", "%A").split()
                if jobs:
                    self.run("scancel", *jobs)
                    wait_until(lambda: not self.run("squeue", "-h", "-o", "%A").strip(),
                               timeout=30, what="the cancelled jobs to end")
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                problems.append(f"cannot end the jobs: {exc}")
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                problems.append(f"{name} ignored SIGTERM")
        # slurmstepd outlives slurmd; a step's socket in the spool directory means one is alive.
        def steps() -> list[str]:
            return [path.name for path in (self.root / "spool").glob(f"{self.node}_*")]

        try:
            wait_until(lambda: not steps(), timeout=10, what="the job steps to end")
        except AssertionError:
            problems.append(f"job steps left running: {', '.join(steps())}")
        return problems


@pytest.fixture
def slurm(daemon: Daemon) -> Iterator[Slurm]:
    """A running one-node Slurm whose prolog and epilog talk to *daemon* (not started yet)."""
    yield from _slurm(daemon)


@pytest.fixture
def slurm_spank(daemon: Daemon) -> Iterator[Slurm]:
    """The same, with scripts/slurm/uenvfs_spank.c built and in its plugstack.conf."""
    root = daemon.root / "spank"
    root.mkdir(mode=0o755)
    plugin = root / "uenvfs_spank.so"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/slurm/spank.h").exists():
        reason = "needs a C compiler and Slurm's spank.h (apt-get install gcc libslurm-dev)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SPANK test, but it {reason}", pytrace=False)
        pytest.skip(reason)
    subprocess.run([cc, "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(plugin),
                    str(SCRIPTS / "uenvfs_spank.c")], check=True)
    line = (f"required {plugin} mountpoint={daemon.mountpoint} statedir={daemon.state_dir} "
            f"uenvfs={_uenvfs_command(root)} timeout={SPANK_TIMEOUT:g}\n")
    yield from _slurm(daemon, line)


def _slurm(daemon: Daemon, plugstack: str = "") -> Iterator[Slurm]:
    if SLURM_REASON is not None:
        if os.environ.get("CI"):
            # CI installs Slurm (.ci/run): a skipped test there would hide a broken setup.
            pytest.fail(f"CI must run the Slurm test, but it {SLURM_REASON}", pytrace=False)
        pytest.skip(SLURM_REASON)
    root = daemon.root / "slurm"
    root.mkdir(mode=0o755)  # munged wants every directory above its socket searchable
    cluster = Slurm(root, daemon.mountpoint, plugstack)
    try:
        yield cluster.start()
    finally:
        problems = cluster.stop()
    if problems:
        pytest.fail("Slurm: " + "; ".join(problems), pytrace=False)


def test_slurm_job_uses_its_uenv(daemon: Daemon, slurm: Slurm) -> None:
    _hello(daemon)
    daemon.expect(r"acquire nosuch slurm-\d+( \d+)?: failed")
    go = slurm.root / "go"
    job = slurm.sbatch("--comment=uenv=hello,nosuch note=x",
                       f"--wrap={daemon.mountpoint}/hello/bin/hello; "
                       f"while [ ! -e {go} ]; do sleep 0.1; done")
    alloc = f"slurm-{job}"
    out = slurm.root / f"job-{job}.out"

    def started() -> bool:
        if slurm.state(job) not in ("PENDING", "CONFIGURING", "RUNNING"):
            raise AssertionError(f"job {job} is {slurm.state(job) or 'gone'}:\n{slurm.logs()}")
        return out.exists() and out.read_text() != ""

    wait_until(started, timeout=START_DEADLINE, what=f"job {job} to run hello")
    assert out.read_text() == "hi\n"
    hello = daemon.mount_status("hello")
    assert hello is not None
    assert hello["state"] == "mounted"
    assert hello["allocations"][alloc]["acquired"] is True
    assert "cannot acquire nosuch" in (slurm.root / "prolog.log").read_text()

    go.touch()
    wait_until(lambda: slurm.state(job) == "", timeout=START_DEADLINE,
               what=f"job {job} and its epilog to end")
    wait_until(lambda: alloc not in _allocations(daemon), what=f"the epilog to release {alloc}")
    # The unknown image did not drain the node.
    assert slurm.node_state() == "idle"

    # For a Slurm that gives the prolog no SLURM_JOB_COMMENT: UENVFS_SCONTROL=1 asks scontrol.
    held = slurm.sbatch("--hold", "--comment=uenv=hello", "--wrap=true")
    done = _script("prolog", daemon, held, UENVFS_SCONTROL="1", **slurm.env)
    assert done.returncode == 0, done.stderr
    assert _allocations(daemon)[f"slurm-{held}"] == {
        "hello": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
    assert _script("epilog", daemon, held).returncode == 0
    assert f"slurm-{held}" not in _allocations(daemon)


def _sitting_job(daemon: Daemon, slurm: Slurm, body: str,
                 asks: tuple[str, ...] = ("--comment=uenv=greet",),
                 env: dict[str, str] | None = None) -> str:
    """Run a job asking for `greet` (with the sbatch options *asks*, and *env* in its
    environment) whose script is *body*:
    its step ends up sitting in /user-environment, prints "in-step" and waits for the file
    {go}. Checks the job's allocation in .status meanwhile; returns the job's output once it
    and its epilog ended."""
    go = slurm.root / "go"
    script = slurm.root / "job.sh"
    script.write_text("#!/bin/sh\n" + body.format(go=go))
    job = slurm.sbatch(*asks, str(script), env=env)
    alloc = f"slurm-{job}"
    out = slurm.root / f"job-{job}.out"

    def stepping() -> bool:
        if slurm.state(job) not in ("PENDING", "CONFIGURING", "RUNNING"):
            raise AssertionError(f"job {job} is {slurm.state(job) or 'gone'}:\n"
                                 f"{out.read_text() if out.exists() else ''}{slurm.logs()}")
        return out.exists() and "in-step" in out.read_text()

    wait_until(stepping, timeout=START_DEADLINE, what=f"job {job}'s step to run greet")
    # The step sits in the image's kernel mount, bound in its namespace (its working
    # directory; its `sleep` too, at times), which uenvfs sees no request of: its allocation,
    # acquired by the prolog, uses the image.
    def sitting() -> bool:
        use = _allocations(daemon).get(alloc, {}).get("greet")
        return isinstance(use, dict) and use["acquired"] is True and use["cwd"] == 0

    try:
        wait_until(sitting, what=f"{alloc}'s use in .status")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {_allocations(daemon)}; {daemon.cli('status').stdout}"
                             f"{out.read_text()}") from None
    go.touch()
    wait_until(lambda: slurm.state(job) == "", timeout=START_DEADLINE,
               what=f"job {job} and its epilog to end")
    wait_until(lambda: alloc not in _allocations(daemon), what=f"the epilog to release {alloc}")
    return out.read_text()


def _serve_greet(daemon: Daemon) -> None:
    work = daemon.root / "cc"
    work.mkdir()
    daemon.image("greet", greet_files(work), mode=0o755)
    daemon.start()


def test_slurm_job_runs_in_its_uenv(daemon: Daemon, slurm: Slurm, mount_points: None) -> None:
    """A batch script line and an srun line run a program built for /user-environment."""
    _serve_greet(daemon)
    uenvfs = f"{_uenvfs_command(slurm.root)} run --mountpoint {daemon.mountpoint} greet --"
    out = _sitting_job(daemon, slurm, f"""\
{uenvfs} /user-environment/bin/greet
srun {uenvfs} sh -c 'cd /user-environment && bin/greet && echo in-step &&
    while [ ! -e {{go}} ]; do sleep 0.1; done'
""")
    assert out == "hello from libgreet\nhello from libgreet\nin-step\n"


def test_slurm_steps_start_in_the_acquired_uenv(daemon: Daemon, slurm_spank: Slurm,
                                                mount_points: None) -> None:
    """With the SPANK plugin, the comment alone puts every task of the job in the image."""
    slurm = slurm_spank
    _serve_greet(daemon)
    out = _sitting_job(daemon, slurm, """\
/user-environment/bin/greet
echo "$UENV_MOUNT_LIST"
srun sh -c '/user-environment/bin/greet && cd /user-environment && echo in-step &&
    while [ ! -e {go} ]; do sleep 0.1; done'
""")
    assert out == (f"hello from libgreet\n{daemon.images}/greet.sqfs:/user-environment\n"
                   "hello from libgreet\nin-step\n")
    assert not is_mounted(Path("/user-environment"))

    # A job that acquired nothing is left alone; one whose image has no mount point here
    # fails at once, saying why.
    plain = slurm.sbatch("--wrap=test -e /user-environment/bin/greet || echo not-here")
    wait_until(lambda: slurm.state(plain) == "", timeout=START_DEADLINE, what="the plain job")
    assert (slurm.root / f"job-{plain}.out").read_text() == "not-here\n"
    elsewhere = daemon.root / "gone"
    daemon.image("away", {"meta/env.json": json.dumps({"mount": str(elsewhere)})})
    daemon.control("reload")
    failing = slurm.sbatch("--comment=uenv=away", "--wrap=echo ran")
    wait_until(lambda: slurm.state(failing) == "", timeout=START_DEADLINE,
               what="the job whose mount point is missing")
    failed = (slurm.root / f"job-{failing}.out").read_text()
    assert "ran" not in failed
    assert f"mount point {elsewhere} does not exist: root must create it" in failed


def _output(slurm: Slurm, job: int) -> str:
    out = slurm.root / f"job-{job}.out"
    return out.read_text() if out.exists() else ""


def _ended(slurm: Slurm, job: int) -> bool:
    return slurm.state(job) == ""


def test_a_stopped_uenvfs_holds_up_only_the_jobs_with_images(
        daemon: Daemon, slurm_spank: Slurm, mount_points: None) -> None:
    """With the server stopped (kill -STOP), a job without images starts at once (before: it
    waited as long as the server did), and a task of a job with images fails after the
    plugin's timeout, saying why."""
    slurm = slurm_spank
    _serve_greet(daemon)
    go = slurm.root / "go"
    job = slurm.sbatch("--comment=uenv=greet", f"--wrap=echo started; "
                       f"while [ ! -e {go} ]; do sleep 0.1; done; "
                       "srun /user-environment/bin/greet; echo srun exit $?")
    wait_until(lambda: "started" in _output(slurm, job), timeout=START_DEADLINE,
               what=f"job {job} to start")
    server = daemon.kill_server(signal.SIGSTOP)
    try:
        plain = slurm.sbatch("--wrap=echo plain")
        wait_until(lambda: _output(slurm, plain) == "plain\n", timeout=START_DEADLINE,
                   what="a job without images to run while uenvfs is stopped")
        began = time.monotonic()
        go.touch()
        wait_until(lambda: "srun exit" in _output(slurm, job), timeout=START_DEADLINE,
                   what=f"job {job}'s step to fail")
        took = time.monotonic() - began
    finally:
        os.kill(server, signal.SIGCONT)
    out = _output(slurm, job)
    assert "hello from libgreet" not in out
    assert (f"uenvfs: uenvfs did not answer within {SPANK_TIMEOUT:g} s: job {job} needs images "
            f"(slurm-{job} acquired them); its task does not start") in out, out
    assert "srun exit 0" not in out
    assert SPANK_TIMEOUT <= took < SPANK_TIMEOUT + 30, took
    for ended in (job, plain):
        wait_until(functools.partial(_ended, slurm, ended), timeout=START_DEADLINE,
                   what=f"job {ended} and its epilog to end")
    assert slurm.node_state() == "idle"


def test_a_huge_status_does_not_start_tasks_without_their_image(
        daemon: Daemon, slurm_spank: Slurm, mount_points: None) -> None:
    """`.status` bloated far beyond 16 MiB (120,000 acquisitions of 127-character allocation
    names, before the job's own) does not make the plugin start the job's tasks without the
    image it acquired (before: it read 16 MiB of `.status`, did not find the job there, and
    started them without it)."""
    slurm = slurm_spank
    daemon.image("aaa", {"f": "filler"})  # listed in .status before greet
    _serve_greet(daemon)
    daemon.control("acquire aaa filler")
    assert daemon.stop() == 0  # what is acquired stays mounted, for the next start
    journal = daemon.state_dir / "journal.json"
    document = json.loads(journal.read_text())
    document["mounts"]["aaa"]["acquired"] += [f"{'a' * 120}{i:07d}" for i in range(120_000)]
    journal.write_text(json.dumps(document))
    daemon.start()
    with (daemon.mountpoint / ".status").open("rb") as status:
        assert len(status.read()) > 20 << 20
    job = slurm.sbatch("--comment=uenv=greet", "--wrap=/user-environment/bin/greet; "
                       'echo "$UENV_MOUNT_LIST"')
    wait_until(lambda: slurm.state(job) == "", timeout=START_DEADLINE * 2,
               what=f"job {job} and its epilog to end")
    assert _output(slurm, job) == (f"hello from libgreet\n{daemon.images}/greet.sqfs:"
                                   "/user-environment\n")
    daemon.control("reconcile --none")


# -- uenv's options: --uenv, --view, SLURM_UENV, SLURM_UENV_VIEW ------------------------------


def _serve_two(daemon: Daemon) -> None:
    """greet (for /user-environment, view default) and tools (for /user-tools, view tools),
    and two images of a repository, both labelled prgenv-gnu."""
    work = daemon.root / "cc"
    work.mkdir()
    daemon.image("greet", greet_files(work), mode=0o755)
    daemon.image("tools", {"bin/tool": "#!/bin/sh\necho tool here\n",
                           "meta/env.json": meta_json("tools-env", "/user-tools", "tools")},
                 mode=0o755)
    pulled = [Pulled(build_image(work / f"{version}.sqfs", {"v": version}).read_bytes(),
                     "2024-11-20", "daint", "gh200", "prgenv-gnu", version, ("v1",))
              for version in ("24.11", "24.7")]
    repo = make_repository(daemon.root / "repo", pulled)
    daemon.config = f'system = "daint"\nuarch = "gh200"\nrepos = ["{repo}"]\n'
    daemon.start()


def test_uenv_options_in_the_batch_script_and_its_steps(daemon: Daemon, slurm_spank: Slurm,
                                                         mount_points: None) -> None:
    """uenv's job script runs unchanged: two images, two views, in the batch script and in
    an srun step (which does not apply the views again)."""
    slurm = slurm_spank
    _serve_two(daemon)
    show = 'echo "$0 $UENV_MOUNT_LIST $UENV_VIEW $GREET_ENV_HOME"; echo "$0 PATH=$PATH"'
    out = _sitting_job(daemon, slurm, f"""greet && tool && sh -c '{show}' batch
srun sh -c 'greet && tool && sh -c '"'"'{show}'"'"' step && cd /user-tools && echo in-step &&
    while [ ! -e {{go}} ]; do sleep 0.1; done'
""", ("--uenv=greet,tools", "--view=default,tools-env:tools"))
    lines = out.splitlines()
    mounts = (f"{daemon.images}/greet.sqfs:/user-environment,"
              f"{daemon.images}/tools.sqfs:/user-tools")
    views = "/user-environment:greet-env:default,/user-tools:tools-env:tools"
    # The views prepend their bin directories; like uenv, a later duplicate goes.
    entries = ["/user-tools/bin", "/user-environment/bin", *SBIN_PATH.split(os.pathsep)]
    path = "PATH=" + os.pathsep.join(e for e in dict.fromkeys(entries) if e)
    # greet's view sets DEFAULT_HOME (meta_json: the view's name): not GREET_ENV_HOME
    assert lines == ["hello from libgreet", "tool here", f"batch {mounts} {views} ",
                     f"batch {path}", "hello from libgreet", "tool here",
                     f"step {mounts} {views} ", f"step {path}", "in-step"], out
    assert not is_mounted(Path("/user-environment"))


def test_slurm_uenv_alone(daemon: Daemon, slurm_spank: Slurm, mount_points: None) -> None:
    """SLURM_UENV names the images (a name and a label here), as --uenv would."""
    slurm = slurm_spank
    _serve_two(daemon)
    out = _sitting_job(daemon, slurm, """\
/user-environment/bin/greet; cat /user-tools/v; echo; echo "$UENV_VIEW"
srun sh -c 'cat /user-tools/v && echo && cd /user-environment && echo in-step &&
    while [ ! -e {go} ]; do sleep 0.1; done'
""", (), {"SLURM_UENV": "greet,prgenv-gnu/24.11:v1:/user-tools"})
    assert out == "hello from libgreet\n24.11\n\n24.11\nin-step\n"


def test_uenv_errors_name_the_image_or_view(daemon: Daemon, slurm_spank: Slurm,
                                            mount_points: None) -> None:
    """Each error fails the job before its script runs, with one line that names the image
    or view; an error in an srun fails that step only."""
    slurm = slurm_spank
    _serve_two(daemon)
    daemon.expect(r"acquire (nosuch|prgenv-gnu) slurm-\d+ \d+: failed")
    wrong = {
        "--uenv=nosuch": "image nosuch: no image named 'nosuch' and no uenv label matches it",
        "--uenv=prgenv-gnu": "image prgenv-gnu: prgenv-gnu is ambiguous",
        "--uenv=greet --view=nosuchview": "no view 'nosuchview': greet has default",
        "--uenv=greet:/no-such-dir": "greet: mount point /no-such-dir does not exist",
        "--uenv=greet,tools:/user-environment": "greet and tools both want mount point "
                                                "/user-environment",
    }
    jobs = {options: slurm.sbatch(*options.split(), "--wrap=echo ran") for options in wrong}
    stepping = slurm.sbatch("--uenv=greet", "--wrap=srun --view=nosuchview true; "
                            'echo "srun exit $?"; /user-environment/bin/greet; '
                            'srun true && echo "srun ok"')
    for job in [*jobs.values(), stepping]:
        wait_until(functools.partial(_ended, slurm, job), timeout=START_DEADLINE,
                   what=f"job {job} and its epilog to end")
    for options, job in jobs.items():
        out = _output(slurm, job)
        assert out.startswith(f"uenvfs: {wrong[options]}"), (options, out)
        # One line of the plugin's; then Slurm's own (its plugin failed).
        assert [line for line in out.splitlines() if "uenvfs: " in line] == [
            out.splitlines()[0]], (options, out)
    lines = [line for line in _output(slurm, stepping).splitlines()
             if not line.startswith(("slurmstepd-", "srun: "))]  # Slurm's own
    assert lines == ["uenvfs: no view 'nosuchview': greet has default", "srun exit 1",
                     "hello from libgreet", "srun ok"], lines
    # A step's slurmstepd made its namespace and can outlive the job's end in squeue for a
    # moment; it runs as root in no job cgroup here (proctrack/linuxproc), so until it exits
    # .status shows that namespace as root's (uid-0). Then nothing may stay.
    wait_until(lambda: _allocations(daemon) == {}, what="no allocation left in .status")
    assert slurm.node_state() == "idle"
