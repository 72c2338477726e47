"""Hostile users against a real `uenvfs serve`: other jobs' latency, the daemon's memory, and
whose opens fail, while the unprivileged user `nobody` attacks (issue 27).

Usage (as root, from a checkout where scripts/setup has run):

    .venv/bin/python scripts/hostile.py --source DIR [--source DIR2 ...]
    .venv/bin/python scripts/hostile.py --source /work/base --source . --rounds 2 \\
        --only status-readers,names --json bench-results/hostile.json

Each `--source` is a uenvfs checkout (a `git worktree` of another commit, for before/after
figures); its code runs the daemon (`python -m uenvfs serve` with PYTHONPATH=DIR, as
scripts/bench.py does), and the table labels it with `git -C DIR rev-parse --short HEAD`
(`+changes` if its uenvfs/ differs from that commit). For each attack, each round starts a
fresh daemon of each source in turn (A, B, A, B...), in a run directory of its own, with a
fresh state directory, hold time 3600 s, `--config /dev/null`, a descriptor limit of
--daemon-nofile (so that a descriptor share, half of it, is quick to exhaust) and, where the
machine has a memory cgroup, in a cgroup of its own limited to --memory-limit-mib (a memory
attack that works meets the OOM killer there, not the machine's). It serves --images images:
`victim` (the victim's file), `attack` (a file and a directory for the attackers) and copies of
`attack` as fillers, so that the mount root lists 1,001 names by default.

The attackers run as nobody (`setpriv --reuid=65534 --regid=65534 --clear-groups`): one small
C program (compiled once with gcc into the work directory) with a mode per attack. The victim is
root in an allocation of its own (PACT_ALLOCATION_ID=victim-job; SLURM_JOB_ID=1001 for
pose-slurm), /usr/bin/python3 -I doing open+read+close of victim/data.txt every
--interval-ms, each sample timed; its figures are the median, p99 and max latency and the
opens per second (a victim that waits opens less: the median alone hides a stall), before the
attack (--baseline seconds, after 0.5 s of warm-up) and during it (--window seconds). Attacks,
by --only name:

  stall (the victim's latency)
    status-readers  --readers processes read `.status` in a loop; root first `acquire`s the
                    attack image for --status-allocations made-up allocations with names of
                    128 characters, so that `.status` is about as big as in the review
                    (~550 KB; the acquisitions take ~25 s here, more the more there are)
    big-env         a process with a --env-kib environment (many short variables; its stack
                    limit raised so that execve takes it) opens and reads a file from a new
                    thread, again and again
    threads         --threads threads, each with a working directory of its own in the attack
                    image, while another process reads `.status` every 0.5 s (each read asks
                    for a scan of /proc); `.metrics` is read at the end for the last scan's time
  memory (the server's VmRSS and VmHWM before, at the peak, after; bytes per held handle)
    status-handles  --status-handles opens of `.status` held (each read once), `.status` made
                    big as for status-readers
    root-handles    --root-handles opens of the mount root held (each listed once: one
                    getdents64), with --images names in it
    names           --names made-up allocation names: one process rewrites its own
                    PACT_ALLOCATION_ID in memory before each new thread, which opens a file;
                    also the ledger's memfd (allocated bytes) and how many of those names it
                    holds, and any `.metrics` line about the ledger
  both
    index-reload    a uenv repository (serve --repo) whose index.db is replaced by one whose
                    `records` view never ends (a recursive CTE), then `reload`; for
                    --index-window seconds: the victim's latency, the servers' memory, the
                    cgroup's peak and OOM kills, servers started by the keeper; then the index
                    is made sane again and the daemon must serve again (needs the cgroup,
                    limited to --index-limit-mib for this attack)
  identity (the victim's opens that fail, by errno)
    pose-slurm      nobody with SLURM_JOB_ID=1001 opens files until refused, and holds them;
                    the victim is job 1001
    fake-ids        three nobody processes with made-up PACT_ALLOCATION_IDs do the same

Every attack undoes itself: its processes are killed (SIGKILL to their process group), the
acquisitions released (`reconcile --none`), the daemon stopped with SIGTERM (killed if it does
not stop, its mounts then cleared lazily, which counts as a problem), its cgroup and run
directory removed. The images and the compiled attacker are cached in --workdir
(/var/tmp/uenvfs-hostile). A run prints one table per attack, a row per source (each figure
the median over rounds), and writes every round to --json (default
bench-results/hostile.json); --logs DIR keeps each daemon's log. Latencies on a shared
2-core machine are noisy: compare sources within one run, over rounds. The defaults take about
four minutes per source and round; the review used 100,000 `.status` handles, 250,000 names
and 20,000 threads (pid_max may be 32,768: mind it).
Exit status: 0, or 1 if an attack failed or something was left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The repository, for tests/mounts.py (mounts and loop devices) and tests/uenv_repos.py (uenv's
# index schema).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness
from harness import choose, git_label, interrupt, positive, uninterruptible

from tests.cgroups import MemoryGroup
from tests.mounts import clean_up, is_mounted, loops_for, mounts_under, wait_until
from tests.uenv_repos import SCHEMA

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
SYSTEM_PYTHON = "/usr/bin/python3"  # nobody cannot run /root/.pyenv's; the victim uses it too
PLAIN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
VICTIM_ALLOC = "victim-job"
SLURM_JOB = "1001"
WARMUP = 0.5  # seconds of the victim's first samples left out (its first open mounts)
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
SAMPLE_EVERY = 0.1  # seconds between memory samples
CONTROL_BATCH = 3900  # bytes per write to .control: one FUSE write each
MAX_ALLOC = 128  # characters of an allocation id (uenvfs.core.names)
DEFAULT_WORKDIR = Path("/var/tmp/uenvfs-hostile")
DEFAULT_JSON = Path("bench-results/hostile.json")

# The attacker, run as nobody. Each mode prints what it did on stdout, a line at a time.
ATTACKER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void wait_forever(void) {
    for (;;) pause();
}

/* Open PATH and read a little of it (a directory: one getdents64): the descriptor, or -errno. */
static int open_touch(const char *path) {
    char buf[4096];
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    long done = fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)
        ? syscall(SYS_getdents64, fd, buf, sizeof buf) : read(fd, buf, 1);
    if (done < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

/* hold PATH COUNT: open PATH up to COUNT times, keep them all open. */
static int hold(const char *path, long count) {
    struct rlimit limit;
    long held = 0;
    int err = 0;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
    for (; held < count; held++) {
        int fd = open_touch(path);
        if (fd < 0) {
            err = -fd;
            break;
        }
    }
    printf("held %ld %d\n", held, err);
    wait_forever();
    return 0;
}

/* readloop PATH PAUSE_MS: open, read to the end, close; again, forever. */
static int readloop(const char *path, long pause_ms) {
    static char buf[1 << 16];
    long reads = 0, errors = 0;
    double last = now();
    for (;;) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            errors++;
        } else {
            while (read(fd, buf, sizeof buf) > 0) {}
            close(fd);
            reads++;
        }
        if (pause_ms) usleep(pause_ms * 1000);
        if (now() - last >= 1.0) {
            printf("reads %ld %ld\n", reads, errors);
            last = now();
        }
    }
}

static void *open_once(void *path) {
    char buf[4096];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return (void *)(long)errno;
    long n = read(fd, buf, sizeof buf);
    int e = errno;
    close(fd);
    return (void *)(long)(n < 0 ? e : 0);
}

/* A new thread (a thread id the daemon has not seen) opens and reads PATH: 0 or an errno. */
static long open_in_new_thread(const char *path) {
    pthread_attr_t attr;
    pthread_t thread;
    void *result;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 16);
    int e = pthread_create(&thread, &attr, open_once, (void *)path);
    pthread_attr_destroy(&attr);
    if (e) return e;
    pthread_join(thread, &result);
    return (long)result;
}

/* opener PATH: open PATH from a new thread, again and again. */
static int opener(const char *path) {
    long opens = 0, errors = 0;
    double last = now();
    for (;;) {
        if (open_in_new_thread(path)) errors++;
        opens++;
        if (now() - last >= 1.0) {
            printf("opens %ld %ld\n", opens, errors);
            last = now();
        }
    }
}

/* names PATH COUNT: before each new thread, write a new name over the last 8 characters of
   PACT_ALLOCATION_ID in this process's own environment (what /proc/PID/environ shows). */
static int names(const char *path, long count) {
    char *value = getenv("PACT_ALLOCATION_ID");
    size_t len = value ? strlen(value) : 0;
    long errors = 0, i;
    double start = now(), last = start;
    if (len < 8) {
        fprintf(stderr, "names: PACT_ALLOCATION_ID must be set, 8 characters at least\n");
        return 2;
    }
    for (i = 0; i < count; i++) {
        char digits[9];
        snprintf(digits, sizeof digits, "%08lx", (unsigned long)i);
        memcpy(value + len - 8, digits, 8);
        if (open_in_new_thread(path)) errors++;
        if (now() - last >= 1.0) {
            printf("named %ld %ld\n", i + 1, errors);
            last = now();
        }
    }
    printf("named %ld %ld done %.3f\n", count, errors, now() - start);
    return 0;
}

static atomic_long sitting, failed;
static atomic_int first_error;
static const char *sit_dir;

static void *sit(void *unused) {
    (void)unused;
    if (unshare(CLONE_FS) != 0 || chdir(sit_dir) != 0) {
        int none = 0;
        atomic_compare_exchange_strong(&first_error, &none, errno);
        atomic_fetch_add(&failed, 1);
    } else {
        atomic_fetch_add(&sitting, 1);
    }
    wait_forever();
    return NULL;
}

/* threads DIR COUNT: COUNT threads, each with a working directory of its own in DIR. */
static int threads(const char *dir, long count) {
    pthread_attr_t attr;
    long started = 0;
    int err = 0;
    sit_dir = dir;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 16);
    for (; started < count; started++) {
        pthread_t thread;
        err = pthread_create(&thread, &attr, sit, NULL);
        if (err) break;
    }
    while (atomic_load(&sitting) + atomic_load(&failed) < started) usleep(1000);
    printf("threads %ld %d\n", (long)atomic_load(&sitting), err ? err : atomic_load(&first_error));
    wait_forever();
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 4 && !strcmp(argv[1], "hold")) return hold(argv[2], atol(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "readloop")) return readloop(argv[2], atol(argv[3]));
    if (argc == 3 && !strcmp(argv[1], "opener")) return opener(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "names")) return names(argv[2], atol(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "threads")) return threads(argv[2], atol(argv[3]));
    fprintf(stderr, "usage: hold PATH N | readloop PATH MS | opener PATH | names PATH N | "
                    "threads DIR N\n");
    return 2;
}
"""

# The victim: open+read+close of argv[1] every argv[2] seconds; one line per sample:
# start (CLOCK_MONOTONIC), latency, errno (0: it worked).
VICTIM_CODE = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
path, interval = sys.argv[1], float(sys.argv[2])
due = time.monotonic()
while True:
    start = time.monotonic()
    code = 0
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError as exc:
        code = exc.errno or -1
    end = time.monotonic()
    sys.stdout.write(f"{start:.6f} {end - start:.6f} {code}\\n")
    sys.stdout.flush()
    due += interval
    if due > end:
        time.sleep(due - end)
    else:
        due = end
"""

# Writes stdin's lines to argv[1] (.control), batched into writes of at most argv[2] bytes.
CONTROL_CODE = """
import os, sys
lines = sys.stdin.buffer.read().splitlines(keepends=True)
limit = int(sys.argv[2])
fd = os.open(sys.argv[1], os.O_WRONLY)
batch = b""
for line in lines:
    if batch and len(batch) + len(line) > limit:
        os.write(fd, batch)
        batch = b""
    batch += line
if batch:
    os.write(fd, batch)
os.close(fd)
"""

# uenv's schema, but a `records` view that never ends.
ENDLESS_RECORDS = SCHEMA.split("CREATE VIEW records")[0] + """
CREATE VIEW records AS
WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r)
SELECT 'daint' AS system, 'gh200' AS uarch, 'endless' || n AS name, '1.0' AS version,
       'v' || n AS tag, '2024-01-01' AS date, 1 AS size,
       '""" + "ab" * 32 + """' AS sha256, '""" + "ab" * 8 + """' AS id
FROM r;
"""


class HostileError(Exception):
    """An attack cannot go on; the message says why."""


@dataclass(frozen=True)
class Source:
    path: Path
    label: str


@dataclass(frozen=True)
class Settings:
    sources: tuple[Source, ...]
    only: tuple[str, ...]
    rounds: int
    workdir: Path
    json_path: Path
    logs: Path | None
    images: int
    status_allocations: int
    status_handles: int
    root_handles: int
    names: int
    threads: int
    readers: int
    env_kib: int
    daemon_nofile: int
    memory_limit_mib: int
    index_limit_mib: int
    baseline: float
    window: float
    index_window: float
    interval_ms: float

    @property
    def images_dir(self) -> Path:
        return self.workdir / "images"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def attacker(self) -> Path:
        return self.workdir / "bin" / "hostile-attacker"


# -- small helpers ---------------------------------------------------------------------------


def note(message: str) -> None:
    print(f"hostile: {message}", file=sys.stderr, flush=True)


def run(command: Sequence[str], timeout: float | None = 60.0, input_text: str | None = None,
        env: dict[str, str] | None = None) -> str:
    """Run a command; its stdout, or HostileError with its stderr (or the timeout)."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, env=env,
                              input=input_text, timeout=timeout, check=False,
                              stdin=None if input_text is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise HostileError(f"{command[0]} took over {timeout:g} s") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        raise HostileError(f"{Path(command[0]).name} failed (exit {done.returncode}): {last}")
    return done.stdout


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    wait_until(predicate, timeout, what, error=HostileError)


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code)) if code else "-"


def proc_memory(pid: int) -> tuple[int, int] | None:
    """VmRSS and VmHWM of *pid* in bytes; None once it is gone."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return None
    if len(found) < 2:
        return None
    return found["VmRSS"], found["VmHWM"]


def children(pid: int) -> list[int]:
    """The processes whose parent is *pid*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least *fraction* of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@contextlib.contextmanager
def stack_limit(size: int) -> Iterator[None]:
    """Children started meanwhile may pass execve an environment of up to size/4 (6 MiB at
    most): the kernel bounds arguments and environment by a quarter of the stack limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    wanted = size if hard == resource.RLIM_INFINITY else min(size, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))


# -- processes -------------------------------------------------------------------------------


@dataclass
class Child:
    """A started process (its own process group) whose stdout and stderr go to files."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    def lines(self) -> list[str]:
        try:
            return self.out.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def last(self, word: str) -> list[str] | None:
        """The words of the last complete line that starts with *word*."""
        text = self.out.read_text(errors="replace") if self.out.exists() else ""
        complete = text[:text.rfind("\n") + 1].splitlines()
        for line in reversed(complete):
            words = line.split()
            if words and words[0] == word:
                return words
        return None

    def wait_line(self, word: str, timeout: float, final: Callable[[list[str]], bool]
                  = lambda words: True) -> list[str]:
        """Wait for a line that starts with *word* (and satisfies *final*)."""
        end = time.monotonic() + timeout
        while True:
            words = self.last(word)
            if words is not None and final(words):
                return words
            if self.popen.poll() is not None:
                raise HostileError(f"{self.name} exited {self.popen.returncode}: "
                                   f"{self.stderr()[-500:]}")
            if time.monotonic() > end:
                raise HostileError(f"{self.name}: no '{word}' line after {timeout:g} s")
            time.sleep(0.05)

    def stderr(self) -> str:
        try:
            return self.err.read_text(errors="replace").strip()
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL to its process group (its threads and any child), and reap it."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            note(f"{self.name} (pid {self.popen.pid}) did not die 30 s after SIGKILL")


@dataclass
class Victim:
    """The root process of another allocation timing its open+read+close of a file."""

    child: Child
    started: float
    killed_at: float | None = None

    def stop(self) -> list[tuple[float, float, int]]:
        """Stop it; its samples. One still waiting in an open after 3 s is killed, and counts as
        a sample from its last one's end until then (how long it had waited, at least)."""
        popen = self.child.popen
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(3)
            except subprocess.TimeoutExpired:
                self.killed_at = time.monotonic()
                self.child.kill()
        samples = []
        for line in self.child.lines():
            with contextlib.suppress(ValueError):
                start, latency, code = line.split()
                samples.append((float(start), float(latency), int(code)))
        if self.killed_at is not None:
            since = samples[-1][0] + samples[-1][1] if samples else self.started
            samples.append((since, self.killed_at - since, -1))
        return samples


def latency_figures(samples: Sequence[tuple[float, float, int]], begin: float,
                    end: float) -> dict[str, Any]:
    """Median, p99 and max latency (ms) of the samples started in [begin, end), how many
    per second (a victim that waits makes few: the median alone hides a stall); errors by
    name (STUCK: the victim still waited when it was stopped)."""
    chosen = [s for s in samples if begin <= s[0] < end]
    latencies = [s[1] * 1000 for s in chosen]
    errors: dict[str, int] = {}
    for _, _, code in chosen:
        if code:
            name = "STUCK" if code < 0 else errno_name(code)
            errors[name] = errors.get(name, 0) + 1
    if not latencies:
        return {"n": 0, "median_ms": None, "p99_ms": None, "max_ms": None, "errors": errors}
    return {"n": len(chosen), "per_s": round(len(chosen) / max(end - begin, 1e-3), 1),
            "median_ms": round(statistics.median(latencies), 3),
            "p99_ms": round(percentile(latencies, 0.99), 3),
            "max_ms": round(max(latencies), 3), "errors": errors,
            "ok": sum(1 for s in chosen if s[2] == 0)}


# -- the daemon ------------------------------------------------------------------------------


@dataclass
class Daemon:
    """One `uenvfs serve` of *source*, with everything of its own under `run_dir`: mountpoint
    `mnt`, state `state`, log `uenvfs.log`, working directory `cwd` (root's, empty)."""

    settings: Settings
    source: Source
    run_dir: Path
    repo: Path | None = None
    group: MemoryGroup | None = None
    process: subprocess.Popen[bytes] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def mountpoint(self) -> Path:
        return self.run_dir / "mnt"

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "state"

    @property
    def log(self) -> Path:
        return self.run_dir / "uenvfs.log"

    def start(self) -> None:
        cwd = self.run_dir / "cwd"
        for directory in (self.mountpoint, cwd):
            directory.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o755)
        command = [sys.executable, "-m", "uenvfs", "serve",
                   "--mountpoint", str(self.mountpoint),
                   "--images", str(self.settings.images_dir),
                   "--state-dir", str(self.state_dir), "--hold-time", "3600",
                   "--config", "/dev/null"]
        if self.repo is not None:
            command += ["--repo", str(self.repo)]
        # The limit, and the cgroup before the daemon runs: its server inherits both.
        procs = str(self.group.procs) if self.group else "/dev/null"
        wrapper = ["sh", "-c", 'ulimit -n "$1" && echo $$ > "$2" && shift 2 && exec "$@"', "sh",
                   str(self.settings.daemon_nofile), procs, *command]
        env = {**os.environ, "PYTHONPATH": str(self.source.path)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(wrapper, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log, start_new_session=True, env=env,
                                            cwd=cwd)
        wait_for(self.serving, READY_TIMEOUT, f"uenvfs of {self.source.label} to serve")

    def serving(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise HostileError(f"uenvfs exited {self.process.returncode} before serving "
                               f"(log: {self.log})")
        return is_mounted(self.mountpoint, "fuse") and b" serving " in self.log.read_bytes()

    def servers(self) -> list[int]:
        """The keeper's server processes (`python -m uenvfs serve` children of it)."""
        assert self.process is not None
        found = []
        for pid in children(self.process.pid):
            with contextlib.suppress(OSError):
                if b"uenvfs" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    def memory(self) -> tuple[int, int]:
        """The largest VmRSS and VmHWM of the servers (0, 0 while there is none)."""
        figures = [m for m in map(proc_memory, self.servers()) if m is not None]
        if not figures:
            return 0, 0
        return max(m[0] for m in figures), max(m[1] for m in figures)

    def read(self, name: str, timeout: float = 30.0) -> bytes:
        """A control file, read by a child that a stuck daemon cannot stop."""
        try:
            done = subprocess.run(["cat", str(self.mountpoint / name)], capture_output=True,
                                  timeout=timeout, check=True)
        except (subprocess.SubprocessError, OSError) as exc:
            raise HostileError(f"cannot read {name}: {exc}") from exc
        return done.stdout

    def status(self, timeout: float = 30.0) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.read(".status", timeout))
        return document

    def answers(self) -> bool:
        """Whether `.status` can be read within 5 s."""
        try:
            self.read(".status", timeout=5)
        except HostileError:
            return False
        return True

    def metrics(self, prefix: str) -> dict[str, float]:
        """The `.metrics` samples whose name starts with *prefix*."""
        found = {}
        for line in self.read(".metrics").decode(errors="replace").splitlines():
            if line.startswith(prefix):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    found[name] = float(value)
        return found

    def control(self, lines: Sequence[str], timeout: float | None = 120.0) -> None:
        run([SYSTEM_PYTHON, "-I", "-c", CONTROL_CODE, str(self.mountpoint / ".control"),
             str(CONTROL_BATCH)], timeout=timeout, input_text="".join(f"{x}\n" for x in lines))

    def control_later(self, line: str) -> Child:
        """Write one command from a child that may wait as long as the command takes."""
        out, err = self.run_dir / "control.out", self.run_dir / "control.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(
                [SYSTEM_PYTHON, "-I", "-c", CONTROL_CODE, str(self.mountpoint / ".control"),
                 str(CONTROL_BATCH)], stdin=subprocess.PIPE, stdout=stdout, stderr=stderr,
                start_new_session=True)
        assert popen.stdin is not None
        popen.stdin.write(f"{line}\n".encode())
        popen.stdin.close()
        return Child(f"control {line!r}", popen, out, err)

    def ledger(self, pattern: re.Pattern[bytes]) -> dict[str, Any]:
        """The server's ledger memfd: bytes allocated, and the distinct matches of *pattern*
        in it (names it keeps)."""
        for pid in self.servers():
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    path = f"/proc/{pid}/fd/{fd}"
                    if os.readlink(path).startswith("/memfd:uenvfs-ledger"):
                        allocated = os.stat(path).st_blocks * 512
                        content = Path(path).read_bytes()
                        return {"ledger_mib": round(allocated / MIB, 2),
                                "names_in_ledger": len(set(pattern.findall(content)))}
        return {"ledger_mib": None, "names_in_ledger": None}

    def refcounts(self) -> dict[str, int]:
        return {m["name"]: m["refcount"] for m in self.status(timeout=10)["mounts"]}

    def stop(self) -> None:
        """Release every acquisition, wait for every use to end, SIGTERM (SIGKILL if it does
        not stop); anything left mounted is a problem, cleared lazily."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            try:
                self.control(["reconcile --none"], timeout=30)
                wait_for(lambda: not any(self.refcounts().values()), 30.0,
                         "every image's refcount to drop to 0")
            except HostileError as exc:
                self.problems.append(f"{self.source.label}: before the stop: {exc}")
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.problems.append(f"{self.source.label}: uenvfs did not stop "
                                     f"{STOP_TIMEOUT:g} s after SIGTERM; killed")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if process.returncode != 0:
            self.problems.append(f"{self.source.label}: uenvfs serve exited "
                                 f"{process.returncode} (log: {self.log})")
        if self.group is not None:
            for pid in self.group.pids():  # a server the keeper left behind
                self.problems.append(f"{self.source.label}: pid {pid} outlived uenvfs; killed")
            if not self.group.remove():
                self.problems.append(f"cannot remove the cgroup {self.group.path}")


# -- one attack on one daemon ----------------------------------------------------------------


@dataclass
class Attack:
    """The processes of one attack on one daemon, all killed at the end."""

    settings: Settings
    daemon: Daemon
    children: list[Child] = field(default_factory=list)
    victims: list[Victim] = field(default_factory=list)

    @property
    def mnt(self) -> Path:
        return self.daemon.mountpoint

    def attacker(self, name: str, args: Sequence[str],
                 env: dict[str, str] | None = None) -> Child:
        """The attacker program as nobody, in its own process group, in /."""
        return self.spawn(name, [*SETPRIV, str(self.settings.attacker), *args],
                          {**PLAIN_ENV, **(env or {})})

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        index = len(self.children)
        out = self.daemon.run_dir / f"{index}-{name}.out"
        err = self.daemon.run_dir / f"{index}-{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=stderr, start_new_session=True, env=env, cwd="/")
        child = Child(name, popen, out, err)
        self.children.append(child)
        return child

    def victim(self, env: dict[str, str]) -> Victim:
        """The victim, root, another allocation: open+read+close of victim/data.txt."""
        child = self.spawn("victim", [SYSTEM_PYTHON, "-I", "-c", VICTIM_CODE,
                                      str(self.mnt / "victim" / "data.txt"),
                                      str(self.settings.interval_ms / 1000)],
                           {**PLAIN_ENV, **env})
        victim = Victim(child, time.monotonic())
        self.victims.append(victim)
        return victim

    def kill_all(self) -> None:
        for victim in self.victims:
            victim.stop()
        for child in self.children:
            child.kill()

    def fill_status(self) -> int:
        """Root acquires the attack image for made-up allocations of the longest names
        (acquisitions cost more the more there are): `.status` grows by ~200 bytes each. Its
        size."""
        count = self.settings.status_allocations
        padding = "x" * (MAX_ALLOC - len("fill-000000-"))
        self.daemon.control([f"acquire attack fill-{i:06d}-{padding}" for i in range(count)])
        return len(self.daemon.read(".status"))


class Sampler:
    """Samples the servers' memory every SAMPLE_EVERY seconds in a thread, for the peak."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.rss = self.hwm = 0
        self.servers: set[int] = set()  # every server seen
        self.deaths: list[float] = []  # when a server seen before was gone
        self._live: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_EVERY)

    def sample(self) -> None:
        servers = self.daemon.servers()
        self.servers.update(servers)
        self.deaths += [time.monotonic()] * len(self._live - set(servers))
        self._live = set(servers)
        for pid in servers:
            memory = proc_memory(pid)
            if memory is not None:
                self.rss, self.hwm = max(self.rss, memory[0]), max(self.hwm, memory[1])


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


# Each attack starts, and returns a function that ends it (killing its processes) and
# describes it.
Finish = Callable[[], dict[str, Any]]


def measure_stall(attack: Attack, start: Callable[[], Finish]) -> dict[str, Any]:
    """The victim's latency before the attack and while it runs."""
    settings = attack.settings
    victim = attack.victim({"PACT_ALLOCATION_ID": VICTIM_ALLOC})
    time.sleep(WARMUP + settings.baseline)
    began = time.monotonic()
    finish = start()
    running = time.monotonic()
    time.sleep(settings.window)
    ended = time.monotonic()
    info = finish()
    samples = victim.stop()
    return {"before": latency_figures(samples, victim.started + WARMUP, began),
            "during": latency_figures(samples, running, ended),
            "attack_start_s": round(running - began, 2), **info}


def measure_memory(attack: Attack, start: Callable[[], Finish],
                   per: str = "held") -> dict[str, Any]:
    """The servers' memory before, at the peak (the attack in place), and 2 s after it; the
    growth per thing the attack made (*per*: which figure of the attack counts them)."""
    daemon = attack.daemon
    time.sleep(1.0)
    before = daemon.memory()
    with Sampler(daemon) as sampler:
        finish = start()
        time.sleep(1.0)  # a few samples more at the peak
        peak = daemon.memory()
        info = finish()
    time.sleep(2.0)
    after = daemon.memory()
    held = info.get(per) or 0
    growth = max(sampler.rss, peak[0]) - before[0]
    return {"rss_before_mib": mib(before[0]), "hwm_before_mib": mib(before[1]),
            "rss_peak_mib": mib(max(sampler.rss, peak[0])),
            "hwm_peak_mib": mib(max(sampler.hwm, peak[1])),
            "rss_after_mib": mib(after[0]), "hwm_after_mib": mib(after[1]),
            "bytes_per_held": round(growth / held) if held else None, **info}


def holder(attack: Attack, name: str, path: Path, count: int,
           env: dict[str, str] | None = None) -> tuple[Child, int, str]:
    """An attacker holding up to *count* opens of *path*; how many it got and why it stopped."""
    child = attack.attacker(name, ["hold", str(path), str(count)], env)
    words = child.wait_line("held", READY_TIMEOUT + count / 100)
    return child, int(words[1]), errno_name(int(words[2]))


def last_count(child: Child, word: str) -> int | None:
    words = child.last(word)
    return int(words[1]) if words else None


def status_readers(attack: Attack) -> dict[str, Any]:
    size = attack.fill_status()

    def start() -> Finish:
        readers = [attack.attacker("reader", ["readloop", str(attack.mnt / ".status"), "0"])
                   for _ in range(attack.settings.readers)]

        def finish() -> dict[str, Any]:
            reads = sum(last_count(r, "reads") or 0 for r in readers)
            for reader in readers:
                reader.kill()
            return {"status_kib": round(size / 1024), "readers": len(readers),
                    "attacker_reads": reads}
        return finish
    return measure_stall(attack, start)


def big_env(attack: Attack) -> dict[str, Any]:
    # Many short variables, the costliest to parse; pointers and strings must fit in a
    # quarter of the stack limit (at most 6 MiB).
    variables = attack.settings.env_kib * 1024 // 9  # "eXXXXX=1\0": 9 bytes
    env = {**PLAIN_ENV, **{f"e{i:05x}": "1" for i in range(variables)}}

    def start() -> Finish:
        with stack_limit(64 * MIB):
            child = attack.attacker("opener", ["opener", str(attack.mnt / "attack" / "file.txt")],
                                    env)
        environ = Path(f"/proc/{child.popen.pid}/environ")
        try:  # empty until the exec of the attacker is done
            wait_for(environ.read_bytes, 30.0, "the opener to start")
            size = len(environ.read_bytes())
        except (OSError, HostileError) as exc:
            raise HostileError(f"the opener did not start: {child.stderr()[-300:]}") from exc

        def finish() -> dict[str, Any]:
            opens = last_count(child, "opens")
            child.kill()
            return {"environ_kib": round(size / 1024), "variables": variables,
                    "attacker_opens": opens}
        return finish
    return measure_stall(attack, start)


def threads(attack: Attack) -> dict[str, Any]:
    count = attack.settings.threads

    def start() -> Finish:
        sitter = attack.attacker("threads", ["threads", str(attack.mnt / "attack" / "dir"),
                                             str(count)])
        words = sitter.wait_line("threads", READY_TIMEOUT + count / 500)
        reader = attack.attacker("reader", ["readloop", str(attack.mnt / ".status"), "500"])

        def finish() -> dict[str, Any]:
            scans: dict[str, Any]
            try:
                scans = dict(attack.daemon.metrics("uenvfs_process_scan"))
            except HostileError as exc:
                scans = {"error": str(exc)}
            reads = last_count(reader, "reads")
            sitter.kill()
            reader.kill()
            return {"threads": int(words[1]), "threads_errno": errno_name(int(words[2])),
                    "status_reads": reads,
                    "last_scan_s": scans.get("uenvfs_process_scan_seconds"),
                    "scans": scans.get("uenvfs_process_scans_total")}
        return finish
    return measure_stall(attack, start)


def status_handles(attack: Attack) -> dict[str, Any]:
    size = attack.fill_status()

    def start() -> Finish:
        child, held, why = holder(attack, "status-holder", attack.mnt / ".status",
                                  attack.settings.status_handles)

        def finish() -> dict[str, Any]:
            child.kill()
            return {"held": held, "stopped_by": why, "status_kib": round(size / 1024)}
        return finish
    return measure_memory(attack, start)


def root_handles(attack: Attack) -> dict[str, Any]:
    names = [n for n in run(["ls", "-a", str(attack.mnt)]).split() if not n.startswith(".")]

    def start() -> Finish:
        child, held, why = holder(attack, "root-holder", attack.mnt,
                                  attack.settings.root_handles)

        def finish() -> dict[str, Any]:
            child.kill()
            return {"held": held, "stopped_by": why, "root_images": len(names)}
        return finish
    return measure_memory(attack, start)


def made_up_names(attack: Attack) -> dict[str, Any]:
    count = attack.settings.names
    prefix = f"h{secrets.token_hex(3)}-"
    pattern = re.compile(re.escape(prefix.encode()) + rb"[0-9a-f]{8}")
    before = attack.daemon.ledger(pattern)

    def start() -> Finish:
        began = time.monotonic()
        child = attack.attacker("names", ["names", str(attack.mnt / "attack" / "file.txt"),
                                          str(count)],
                                {**PLAIN_ENV, "PACT_ALLOCATION_ID": prefix + "0" * 8})
        try:
            words = child.wait_line("named", READY_TIMEOUT + count / 200,
                                    final=lambda w: "done" in w)
        except HostileError:
            words = child.last("named") or ["named", "0", "0"]
        seconds = time.monotonic() - began

        def finish() -> dict[str, Any]:
            child.kill()
            return {"names_made": int(words[1]), "open_errors": int(words[2]),
                    "seconds": round(seconds, 1)}
        return finish
    result = measure_memory(attack, start, per="names_made")
    after = attack.daemon.ledger(pattern)
    ledger_metrics: dict[str, Any]
    try:
        ledger_metrics = dict(attack.daemon.metrics("uenvfs_ledger"))
    except HostileError as exc:
        ledger_metrics = {"error": str(exc)}
    return {**result, "ledger_mib_before": before["ledger_mib"],
            "ledger_mib_after": after["ledger_mib"], "names_in_ledger": after["names_in_ledger"],
            "ledger_metrics": ledger_metrics}


def write_index(repo: Path, schema: str) -> None:
    """index.db with *schema*, replaced at once (a reader sees the old or the new one)."""
    partial = repo / "index.db.partial"
    partial.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(partial)) as db:
        db.executescript(schema)
        db.commit()
    partial.replace(repo / "index.db")


def index_reload(attack: Attack) -> dict[str, Any]:
    """The endless index at `reload`, for --index-window seconds: the victim's latency, the
    servers' memory, when the first one died, how many the keeper started; then the index is
    made sane again, and the daemon must serve again."""
    daemon, settings = attack.daemon, attack.settings
    assert daemon.repo is not None
    assert daemon.group is not None
    victim = attack.victim({"PACT_ALLOCATION_ID": VICTIM_ALLOC})
    time.sleep(WARMUP + settings.baseline)
    before = daemon.memory()
    with Sampler(daemon) as sampler:
        began = time.monotonic()
        write_index(daemon.repo, ENDLESS_RECORDS)
        reload = daemon.control_later("reload")
        time.sleep(settings.index_window)
        ended = time.monotonic()
        oom_kills = daemon.group.oom_kills()
        answer = reload.popen.poll()
        write_index(daemon.repo, SCHEMA)
        recovered: float | None = None
        with contextlib.suppress(HostileError):
            wait_for(daemon.answers, 60.0, "uenvfs to serve again")
            recovered = time.monotonic() - ended
        reload.kill()
    samples = victim.stop()
    after = daemon.memory()
    reload_answer = ("none yet" if answer is None else "ok" if answer == 0 else
                     (reload.stderr().splitlines() or [f"exit {answer}"])[-1][-200:])
    return {"before": latency_figures(samples, victim.started + WARMUP, began),
            "during": latency_figures(samples, began, ended),
            "rss_before_mib": mib(before[0]), "rss_peak_mib": mib(sampler.rss),
            "hwm_peak_mib": mib(sampler.hwm), "rss_after_mib": mib(after[0]),
            "cgroup_peak_mib": mib(daemon.group.peak()), "oom_kills": oom_kills,
            "first_death_s": round(sampler.deaths[0] - began, 1) if sampler.deaths else None,
            "server_deaths": len([t for t in sampler.deaths if t < ended]),
            "reload_answer": reload_answer,
            "serving_again_after_s": None if recovered is None else round(recovered, 1)}


def measure_identity(attack: Attack, victim_env: dict[str, str],
                     attacker_envs: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Attackers open the attack image's file until refused and hold it all; the victim's
    opens before and meanwhile."""
    settings = attack.settings
    victim = attack.victim(victim_env)
    time.sleep(WARMUP + settings.baseline)
    began = time.monotonic()
    held, holders = [], []
    for i, env in enumerate(attacker_envs):
        child, count, why = holder(attack, f"holder{i}", attack.mnt / "attack" / "file.txt",
                                   settings.daemon_nofile, env)
        held.append({"env": env, "held": count, "stopped_by": why})
        holders.append(child)
    running = time.monotonic()
    time.sleep(settings.window)
    ended = time.monotonic()
    for child in holders:
        child.kill()
    time.sleep(1.0)
    samples = victim.stop()
    return {"before": latency_figures(samples, victim.started + WARMUP, began),
            "during": latency_figures(samples, running, ended), "attackers": held,
            "victim_env": victim_env}


def pose_slurm(attack: Attack) -> dict[str, Any]:
    job = {"SLURM_JOB_ID": SLURM_JOB}
    return measure_identity(attack, job, [job])


def fake_ids(attack: Attack) -> dict[str, Any]:
    tag = secrets.token_hex(3)
    return measure_identity(attack, {"PACT_ALLOCATION_ID": VICTIM_ALLOC},
                            [{"PACT_ALLOCATION_ID": f"made-up-{tag}-{k}"} for k in range(3)])


@dataclass(frozen=True)
class AttackKind:
    name: str  # as in --only
    kind: str  # stall, memory, both, identity: which table
    action: Callable[[Attack], dict[str, Any]]
    repo: bool = False  # the daemon serves a uenv repository
    cgroup: bool = False  # refused without a memory cgroup; its limit is --index-limit-mib


ATTACKS = (
    AttackKind("status-readers", "stall", status_readers),
    AttackKind("big-env", "stall", big_env),
    AttackKind("threads", "stall", threads),
    AttackKind("status-handles", "memory", status_handles),
    AttackKind("root-handles", "memory", root_handles),
    AttackKind("names", "memory", made_up_names),
    AttackKind("index-reload", "both", index_reload, repo=True, cgroup=True),
    AttackKind("pose-slurm", "identity", pose_slurm),
    AttackKind("fake-ids", "identity", fake_ids),
)
ATTACK_NAMES = tuple(a.name for a in ATTACKS)


# -- setup: images and the attacker ----------------------------------------------------------


def ensure_attacker(settings: Settings) -> None:
    """Compile the attacker (again if its source changed), executable by nobody."""
    directory = settings.attacker.parent
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "hostile-attacker.c"
    if settings.attacker.exists() and source.exists() and source.read_text() == ATTACKER_C:
        return
    source.write_text(ATTACKER_C)
    run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(settings.attacker), str(source)])
    for path in (settings.workdir, directory):
        path.chmod(0o755)
    settings.attacker.chmod(0o755)


def ensure_images(settings: Settings) -> None:
    """victim.sqfs, attack.sqfs, and filler copies of attack.sqfs: --images in all."""
    images = settings.images_dir
    images.mkdir(parents=True, exist_ok=True)
    build = settings.workdir / "build"
    for name, files in (("victim", {"data.txt": b"v" * 4096}),
                        ("attack", {"file.txt": b"a" * 4096, "dir/file.txt": b"d\n"})):
        image = images / f"{name}.sqfs"
        if image.exists():
            continue
        shutil.rmtree(build, ignore_errors=True)
        for rel, content in files.items():
            (build / rel).parent.mkdir(parents=True, exist_ok=True)
            (build / rel).write_bytes(content)
        run(["mksquashfs", str(build), str(image) + ".partial", "-all-root", "-noappend",
             "-no-progress", "-quiet"])
        Path(str(image) + ".partial").replace(image)
        shutil.rmtree(build)
    wanted = {f"filler-{i:04d}.sqfs" for i in range(max(0, settings.images - 2))}
    for old in images.glob("filler-*.sqfs"):
        if old.name not in wanted:
            old.unlink()
    for name in sorted(wanted):
        if not (images / name).exists():
            shutil.copyfile(images / "attack.sqfs", images / name)


# -- running the attacks ---------------------------------------------------------------------


@dataclass
class Results:
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    failed: int = 0


def attack_once(settings: Settings, kind: AttackKind, source: Source, round_: int,
                results: Results) -> None:
    run_dir = settings.run_dir / f"{kind.name}-{source.label}-{round_}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    record: dict[str, Any] = {"source": source.label, "round": round_,
                              "load_before": os.getloadavg()[0]}
    started = time.monotonic()
    limit = settings.index_limit_mib if kind.cgroup else settings.memory_limit_mib
    group = MemoryGroup.create(f"uenvfs-hostile-{os.getpid()}-{kind.name}-{round_}",
                               limit * MIB)
    daemon = Daemon(settings, source, run_dir, group=group)
    attack = Attack(settings, daemon)
    try:
        if kind.cgroup and group is None:
            raise HostileError("no memory cgroup of our own to bound the daemon in: skipped")
        if kind.repo:
            daemon.repo = run_dir / "repo"
            daemon.repo.mkdir()
            write_index(daemon.repo, SCHEMA)
        daemon.start()
        record.update(kind.action(attack))
    except HostileError as exc:
        record["error"] = str(exc)
        results.failed += 1
        note(f"{kind.name} on {source.label}: {exc}")
    finally:
        with uninterruptible():
            attack.kill_all()
            if daemon.repo is not None:  # a daemon in a crash loop could not stop
                write_index(daemon.repo, SCHEMA)
            daemon.stop()
            if group is not None and daemon.process is None:
                group.remove()
            found = leftovers(run_dir, settings.images_dir)
            if found:
                clean_up(run_dir)
                clean_up(settings.images_dir)
                daemon.problems.append("left behind, cleared lazily: " + ", ".join(found))
            results.problems += daemon.problems
            if settings.logs is not None and daemon.log.exists():
                settings.logs.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(daemon.log, settings.logs / f"{run_dir.name}.log")
            if not mounts_under(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
    record["seconds"] = round(time.monotonic() - started, 1)
    results.runs.setdefault(kind.name, []).append(record)
    note(f"{kind.name} on {source.label}, round {round_ + 1}: {one_line(kind, record)}")


def leftovers(run_dir: Path, images: Path) -> list[str]:
    """Mounts and loop devices still there after a short wait (autoclear loops detach late)."""
    with contextlib.suppress(HostileError):
        wait_for(lambda: not mounts_under(run_dir) and not loops_for(images), 5.0, "clean-up")
    return [e.mount_point for e in mounts_under(run_dir)] + loops_for(images)


def one_line(kind: AttackKind, record: dict[str, Any]) -> str:
    if "error" in record:
        return f"error: {record['error']}"
    shown = {k: v for k, v in record.items() if k not in ("source", "round", "attackers")}
    if "attackers" in record:
        shown["held"] = [a["held"] for a in record["attackers"]]
    return json.dumps(shown)[:600]


def run_all(settings: Settings, results: Results) -> None:
    for kind in ATTACKS:
        if kind.name not in settings.only:
            continue
        for round_ in range(settings.rounds):
            for source in settings.sources:
                attack_once(settings, kind, source, round_, results)


# -- the report ------------------------------------------------------------------------------


def median_of(records: Sequence[dict[str, Any]], *path: str) -> float | None:
    values = []
    for record in records:
        value: Any = record
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            values.append(float(value))
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def errors_text(records: Sequence[dict[str, Any]], window: str) -> str:
    names: set[str] = set()
    for record in records:
        names.update(record.get(window, {}).get("errors", {}))
    parts = [f"{name} {fmt(median_of(records, window, 'errors', name) or 0, 0)}"
             for name in sorted(names)]
    return ", ".join(parts) or "0"


def stall_rows(records: Sequence[dict[str, Any]]) -> list[str]:
    cells = []
    for window in ("before", "during"):
        cells += [fmt(median_of(records, window, key), 2 if window == "before" else 1)
                  for key in ("median_ms", "p99_ms", "max_ms")]
        cells.append(fmt(median_of(records, window, "per_s"), 0))
    return [*cells, errors_text(records, "during")]


EXTRAS = {
    "status-readers": ("status_kib", "readers", "attacker_reads"),
    "big-env": ("environ_kib", "variables", "attacker_opens"),
    "threads": ("threads", "status_reads", "last_scan_s", "scans"),
    "status-handles": ("status_kib",),
    "root-handles": ("root_images",),
    "names": ("names_made", "seconds", "open_errors", "ledger_mib_before", "ledger_mib_after",
              "names_in_ledger"),
    "index-reload": ("rss_before_mib", "rss_peak_mib", "cgroup_peak_mib", "oom_kills",
                     "first_death_s", "server_deaths", "serving_again_after_s"),
}


def extras(name: str, records: Sequence[dict[str, Any]]) -> str:
    parts = []
    for key in EXTRAS.get(name, ()):
        value = median_of(records, key)
        parts.append(f"{key} {fmt(value, 2 if value is not None and value < 10 else 0)}")
    return "; ".join(parts)


def table(settings: Settings, results: Results) -> str:
    lines = []
    rounds = f"median over {settings.rounds} rounds" if settings.rounds > 1 else "one round"
    for kind in ATTACKS:
        runs = results.runs.get(kind.name)
        if not runs:
            continue
        lines.append("")
        if kind.kind in ("stall", "both"):
            lines.append(f"{kind.name} ({kind.kind}): victim open+read+close every "
                         f"{settings.interval_ms:g} ms, latency in ms, /s its opens per "
                         f"second ({rounds})")
            header = (f"{'source':<16}{'before med':>11}{'p99':>8}{'max':>8}{'/s':>6}"
                      f"{'during med':>12}{'p99':>9}{'max':>9}{'/s':>6}  {'errors':<8}attack")
        elif kind.kind == "memory":
            lines.append(f"{kind.name} (memory): server VmRSS/VmHWM in MiB ({rounds})")
            header = (f"{'source':<16}{'held':>8}{'by':>8}{'RSS before':>11}{'peak':>8}"
                      f"{'after':>8}{'HWM after':>10}{'B/held':>9}  attack")
        else:
            lines.append(f"{kind.name} (identity): the victim's opens ({rounds})")
            header = (f"{'source':<16}{'before ok':>10}{'errors':>8}{'during ok':>10}"
                      f"  {'errors during':<24}attackers held (stopped by)")
        lines += [header, "-" * len(header)]
        for source in settings.sources:
            records = [r for r in runs if r["source"] == source.label and "error" not in r]
            failed = [r for r in runs if r["source"] == source.label and "error" in r]
            if not records:
                lines.append(f"{source.label:<16}error: {failed[0]['error'] if failed else '-'}")
                continue
            lines.append(row(kind, source.label, records))
    return "\n".join(lines)


def row(kind: AttackKind, label: str, records: Sequence[dict[str, Any]]) -> str:
    if kind.kind in ("stall", "both"):
        cells = stall_rows(records)
        return (f"{label:<16}{cells[0]:>11}{cells[1]:>8}{cells[2]:>8}{cells[3]:>6}"
                f"{cells[4]:>12}{cells[5]:>9}{cells[6]:>9}{cells[7]:>6}  {cells[8]:<8}"
                f"{extras(kind.name, records)}")
    if kind.kind == "memory":
        held = "names_made" if kind.name == "names" else "held"
        why = records[0].get("stopped_by", "-") if kind.name != "names" else "-"
        return (f"{label:<16}{fmt(median_of(records, held), 0):>8}{why:>8}"
                f"{fmt(median_of(records, 'rss_before_mib')):>11}"
                f"{fmt(median_of(records, 'rss_peak_mib')):>8}"
                f"{fmt(median_of(records, 'rss_after_mib')):>8}"
                f"{fmt(median_of(records, 'hwm_after_mib')):>10}"
                f"{fmt(median_of(records, 'bytes_per_held'), 0):>9}  "
                f"{extras(kind.name, records)}")
    attackers = "; ".join(f"{a['held']} ({a['stopped_by']})" for a in records[0]["attackers"])
    return (f"{label:<16}{fmt(median_of(records, 'before', 'ok'), 0):>10}"
            f"{errors_text(records, 'before'):>8}{fmt(median_of(records, 'during', 'ok'), 0):>10}"
            f"  {errors_text(records, 'during'):<24}{attackers}")


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "load": os.getloadavg(),
            "pid_max": Path("/proc/sys/kernel/pid_max").read_text().strip()}


def write_json(settings: Settings, results: Results, info: dict[str, Any]) -> None:
    document = {**info, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                     for k, v in vars(settings).items() if k != "sources"},
                "sources": [{"dir": str(s.path), "label": s.label} for s in settings.sources],
                "attacks": results.runs, "problems": results.problems}
    harness.write_json(settings.json_path, document)


# -- main ------------------------------------------------------------------------------------


def seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Attack a real uenvfs serve as nobody; measure latency, memory and "
                    "refused opens (needs root).")
    parser.add_argument("--source", type=Path, action="append", metavar="DIR",
                        help="a uenvfs checkout whose code serves (repeatable; default: this)")
    parser.add_argument("--only", type=lambda text: choose(text, ATTACK_NAMES, "attack"),
                        default=ATTACK_NAMES, metavar="A[,A...]",
                        help="only these attacks: " + ", ".join(ATTACK_NAMES))
    parser.add_argument("--rounds", type=positive, default=1, metavar="N")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, dest="json_path")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--logs", type=Path, metavar="DIR",
                        help="keep each daemon's log here (ATTACK-SOURCE-ROUND.log)")
    counts = parser.add_argument_group("counts and times")
    for flag, default, help_text in (
            ("--images", 1001, "images served (names in the mount root)"),
            ("--status-allocations", 2800, "allocations acquired to make .status big"),
            ("--status-handles", 1000, ".status opens held"),
            ("--root-handles", 1000, "mount root opens held"),
            ("--names", 10000, "made-up allocation names"),
            ("--threads", 10000, "threads sitting in an image"),
            ("--readers", 4, ".status readers"),
            ("--env-kib", 2400, "the big environment's size (at most ~3,000)"),
            ("--daemon-nofile", 4096, "the daemon's descriptor limit (a share is half)"),
            ("--memory-limit-mib", 2048, "the daemon's memory cgroup limit"),
            ("--index-limit-mib", 512, "the same for index-reload")):
        counts.add_argument(flag, type=positive, default=default, metavar="N",
                            help=f"{help_text} (default {default})")
    for flag, default_s, help_text in (
            ("--baseline", 3.0, "seconds of the victim alone"),
            ("--window", 8.0, "seconds of the victim during an attack"),
            ("--index-window", 20.0, "seconds after the endless index's reload"),
            ("--interval-ms", 5.0, "milliseconds between the victim's opens")):
        counts.add_argument(flag, type=seconds, default=default_s, metavar="S",
                            help=f"{help_text} (default {default_s:g})")
    args = parser.parse_args(argv)
    paths = [p.absolute() for p in (args.source or [REPO])]
    labels: list[str] = []
    for path in paths:
        label = git_label(path, path.name)
        labels.append(label if label not in labels else f"{label}-{len(labels)}")
    return Settings(
        sources=tuple(Source(p, lab) for p, lab in zip(paths, labels, strict=True)),
        only=args.only, rounds=args.rounds, workdir=args.workdir.absolute(),
        json_path=args.json_path.absolute(),
        logs=args.logs.absolute() if args.logs else None, images=max(2, args.images),
        status_allocations=args.status_allocations, status_handles=args.status_handles,
        root_handles=args.root_handles, names=args.names, threads=args.threads,
        readers=args.readers, env_kib=args.env_kib, daemon_nofile=args.daemon_nofile,
        memory_limit_mib=args.memory_limit_mib, index_limit_mib=args.index_limit_mib,
        baseline=args.baseline, window=args.window,
        index_window=args.index_window, interval_ms=args.interval_ms)


def check_machine(settings: Settings) -> None:
    if os.geteuid() != 0:
        raise HostileError("run me as root (a real uenvfs serve, setpriv, cgroups)")
    tools = ["setpriv", "gcc", "mksquashfs", "losetup", "cat", "ls", "sh", SYSTEM_PYTHON]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise HostileError(f"missing tools: {', '.join(missing)}")
    for source in settings.sources:
        if not (source.path / "uenvfs" / "__main__.py").exists():
            raise HostileError(f"{source.path} is not a uenvfs checkout")


def prepare(settings: Settings) -> None:
    settings.workdir.mkdir(parents=True, exist_ok=True)
    settings.workdir.chmod(0o755)
    found = clean_up(settings.run_dir) + clean_up(settings.images_dir)
    if found:
        note("cleared what an earlier run left behind: " + ", ".join(found))
    shutil.rmtree(settings.run_dir, ignore_errors=True)
    settings.run_dir.mkdir(parents=True)
    settings.run_dir.chmod(0o755)
    ensure_attacker(settings)
    ensure_images(settings)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    info: dict[str, Any] = {"machine": machine()}
    results = Results()
    try:
        check_machine(settings)
        prepare(settings)
        run_all(settings, results)
    except HostileError as exc:
        note(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        for problem in results.problems:
            note(f"problem: {problem}")
        note("interrupted; every attack was undone")
        return 130
    finally:
        with uninterruptible():
            if not mounts_under(settings.run_dir):
                shutil.rmtree(settings.run_dir, ignore_errors=True)
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["load_after"] = os.getloadavg()
    write_json(settings, results, info)
    print(f"uenvfs hostile-user figures: {info['machine']['nproc']} CPUs, Linux "
          f"{info['machine']['kernel']}; sources: "
          + ", ".join(f"{s.label} ({s.path})" for s in settings.sources))
    print(table(settings, results))
    for problem in results.problems:
        print(f"problem: {problem}")
    print(f"\n{info['elapsed_s']:.0f} s; JSON: {settings.json_path}")
    return 1 if results.problems or results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
