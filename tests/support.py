"""Test support: real SquashFS images, a real `uenvfs serve` process, and leak checks.

The daemon always runs as a separate process: a blocking `os.stat` from the test into the FUSE
mount would deadlock a daemon sharing the test's event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uenvfs.kernel.mountinfo import MountEntry

from .mounts import DEADLINE, is_mounted

# Re-exported: the tests import these from here too.
from .mounts import loops_for as loops_for
from .mounts import mounts_under as mounts_under
from .mounts import wait_until as wait_until

# -- images --------------------------------------------------------------------------------


def build_image(dest: Path, files: Mapping[str, bytes | str], mode: int = 0o644) -> Path:
    """A SquashFS image at *dest* holding *files* (relative path → content)."""
    src = dest.parent / (dest.name + ".src")
    shutil.rmtree(src, ignore_errors=True)
    for rel, content in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(mode)
    if not files:
        src.mkdir(parents=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gensquashfs", "-q", "-f", "-k", "-c", "gzip", "-D", str(src), str(dest)],
                   check=True)
    shutil.rmtree(src)
    return dest


def build_from_pack(dest: Path, pack: str, root: Path, xattrs: str | None = None) -> Path:
    """A SquashFS image from a gensquashfs pack file (paths in it relative to *root*)."""
    pack_file = dest.parent / (dest.name + ".pack")
    pack_file.write_text(pack)
    command = ["gensquashfs", "-q", "-f", "-c", "gzip", "-F", str(pack_file), "-D", str(root)]
    if xattrs is not None:
        xattr_file = dest.parent / (dest.name + ".xattrs")
        xattr_file.write_text(xattrs)
        command += ["-A", str(xattr_file)]
    subprocess.run([*command, str(dest)], check=True)
    return dest


# -- loop devices (the rest is in tests/mounts.py) ----------------------------------------


def loop_count(under: Path) -> int:
    """Loop devices backed by files under *under* (a test's own: others may run beside it)."""
    return len(loops_for(under))


# -- the daemon ----------------------------------------------------------------------------

# Log lines a test may produce on purpose are declared with Daemon.expect().
_BAD_LOG = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


@dataclass
class Daemon:
    """A `uenvfs serve` process on a mountpoint inside the test's tmp_path."""

    root: Path
    hold_time: float | None = 60.0  # None: no --hold-time flag (the configuration file's)
    log_level_flag: bool = True  # False: no --log-level flag (the configuration file's)
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    expected: list[re.Pattern[str]] = field(default_factory=list)
    allow_leftovers: bool = False
    log_offset: int = 0
    config: str = ""  # the text of the daemon's configuration file
    cwd: Path | None = None  # the working directory `serve` is started in (None: the test's)
    nofile: int | None = None  # the daemon's descriptor limit (soft and hard); None: ours
    cgroup: Path | None = None  # the cgroup directory to start it in (its keeper and servers)

    @property
    def mountpoint(self) -> Path:
        return self.root / "mnt"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def backing_root(self) -> Path:
        return self.state_dir / "mnt"

    @property
    def log_path(self) -> Path:
        return self.root / "uenvfs.log"

    def image(self, name: str, files: Mapping[str, bytes | str], mode: int = 0o644) -> Path:
        return build_image(self.images / f"{name}.sqfs", files, mode)

    def command(self) -> list[str]:
        # -P: the installed code, as the `uenvfs` script runs it, never a module of the
        # working directory.
        return [
            sys.executable, "-P", "-m", "uenvfs", "serve",
            "--mountpoint", str(self.mountpoint), "--images", str(self.images),
            "--state-dir", str(self.state_dir),
            *(["--hold-time", str(self.hold_time)] if self.hold_time is not None else []),
            *(["--log-level", "DEBUG" if os.environ.get("UENVFS_TEST_DEBUG") else "INFO"]
              if self.log_level_flag else []),
            "--config", str(self._config_file()),
            *self.extra_args,
        ]

    def _config_file(self) -> Path:
        # Always a config file of the test's, so that /etc/uenvfs.toml cannot change the test.
        path = self.root / "uenvfs.toml"
        path.write_text(self.config)
        return path

    def start(self) -> Daemon:
        self.images.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        env = {**os.environ, **self.env}
        # A session of its own: the keeper, its servers and any keeper they start, killed
        # together by `kill` and checked for leftovers at the end.
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        cwd=self.cwd, preexec_fn=self._confine)
        log.close()
        self.wait_ready()
        return self

    def _confine(self) -> None:
        """In the child, before it runs uenvfs: its descriptor limit and its cgroup."""
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def wait_ready(self) -> None:
        """Wait for our FUSE mount. (Mount ids are reused, so a stale mount of a killed daemon
        cannot be told from ours in mountinfo: the daemon's log says when it mounted.)"""

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"uenvfs serve exited {self.process.returncode}:\n"
                                     + self.log())
            with self.log_path.open("rb") as f:
                f.seek(self.log_offset)
                serving = b" serving " in f.read()
            return serving and is_mounted(self.mountpoint, "fuse.uenvfs")

        wait_until(ready, what="the FUSE mount")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        """Signal the daemon and wait for it; returns its exit code (SIGKILL after timeout)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("uenvfs serve did not stop in time:\n" + self.log()) from None
        return self.process.returncode

    def kill(self) -> None:
        """kill -9 of every uenvfs process of this daemon: keeper and server (without systemd,
        that ends the connection)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        wait_until(lambda: not self.processes_left(), what="every uenvfs process to die")

    def processes_left(self) -> list[int]:
        """The uenvfs processes (keeper, servers) of this daemon's session still there; not
        what they started (a program map's children are the map's business)."""
        assert self.process is not None
        left = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if (fields[0] != "Z" and int(fields[3]) == self.process.pid
                    and b"uenvfs" in cmdline):
                left.append(int(entry.name))
        return left

    def server_pid(self) -> int:
        """The pid of the process answering FUSE requests (from .status)."""
        return int(self.status()["server"]["pid"])

    def kill_server(self, sig: int = signal.SIGKILL) -> int:
        """Kill the server (not the keeper); returns its pid."""
        pid = self.server_pid()
        os.kill(pid, sig)
        return pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def expect(self, pattern: str) -> None:
        """A log line matching *pattern* is wanted by the test, even at WARNING or ERROR."""
        self.expected.append(re.compile(pattern))

    def unexpected_log_lines(self) -> list[str]:
        return [line for line in self.log().splitlines()
                if _BAD_LOG.search(line) and not any(p.search(line) for p in self.expected)]

    # -- talking to it --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads((self.mountpoint / ".status").read_bytes())
        return document

    def mount_status(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.status()["mounts"] if m["name"] == name), None)

    def wait_idle(self, name: str) -> None:
        """Wait until nothing uses *name*: a closed file's release reaches the daemon a little
        after close() returns (the kernel sends it in the background)."""
        wait_until(lambda: (self.mount_status(name) or {"refcount": 0})["refcount"] == 0,
                   what=f"{name} to be idle")

    def control(self, line: str) -> None:
        """Write a command to .control; raises OSError with the daemon's errno."""
        fd = os.open(self.mountpoint / ".control", os.O_WRONLY)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)

    def backing_mounted(self, name: str) -> bool:
        return is_mounted(self.backing_root / name)

    def backing_mounts(self) -> list[MountEntry]:
        return [e for e in mounts_under(self.backing_root)]

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "uenvfs", *args, "--mountpoint", str(self.mountpoint)]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=60)


def errno_of(action: Callable[[], object]) -> int:
    """The errno of the OSError that *action* raises (failing the test if it raises none)."""
    try:
        action()
    except OSError as exc:
        return exc.errno or 0
    raise AssertionError("expected an OSError, got none")


def run_in(cwd: Path | str, script: str, env: Mapping[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a shell *script* in *cwd*, as a job would."""
    return subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)


def spawn_holder(path: Path, alloc: str | None = None,
                 extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """A process that opens *path* and holds it open until its stdin closes."""
    env = {k: v for k, v in os.environ.items() if k not in ("PACT_ALLOCATION_ID", "SLURM_JOB_ID")}
    if alloc is not None:
        env["PACT_ALLOCATION_ID"] = alloc
    env.update(extra_env or {})
    code = ("import sys; f = open(sys.argv[1], 'rb'); f.read(1); print('open', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "open", f"holder failed to open {path}"
    return proc


def release_holder(proc: subprocess.Popen[str]) -> None:
    """Let a holder close its file and exit."""
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.close()
    proc.wait(DEADLINE)
    proc.stdout.close()


def all_names(items: Iterable[MountEntry]) -> list[str]:
    return [e.mount_point for e in items]


def metric(daemon: Daemon, key: str) -> float:
    """One sample of the daemon's .metrics (0 if absent)."""
    for line in (daemon.mountpoint / ".metrics").read_text().splitlines():
        name, _, value = line.rpartition(" ")
        if name == key:
            return float(value)
    return 0.0
