"""What the measuring scripts (scripts/bench.py, scripts/hostile.py, scripts/attachcost.py)
share: command-line words, a git label for a checkout, clean-up that a Ctrl-C cannot cut
short, a JSON file written whole or not at all, dropping the kernel's caches, and a process's
CPU time.

Standard library only; each script puts scripts/ on sys.path (it is its own directory) and
imports this as `harness`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # what /proc/PID/stat counts CPU time in, per second


def choose(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    """The names of a comma-separated *text*, all of them *known*, in *known*'s order: for
    `--only` (argparse's type=; *what* names one of them in the error)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(known)}")
    return tuple(name for name in known if name in names)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def git_label(source: Path, unknown: str) -> str:
    """*source*'s short commit, `+changes` if its uenvfs/ differs from it; *unknown* if git
    does not say."""
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "uenvfs"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return (head or unknown) + ("+changes" if dirty else "")


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Clean-up must finish: a second Ctrl-C (or SIGTERM) must not cut it short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupt(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler: stop as Ctrl-C does, taking every mount down on the way out."""
    raise KeyboardInterrupt


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write *document* to *path* through a `.partial` file: a reader sees all of it or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2, default=str) + "\n")
    partial.replace(path)


def drop_caches(level: int) -> None:
    """3: page cache, dentries and inodes; 2: dentries and inodes only."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(f"{level}\n")



def cpu_seconds(pid: int) -> float:
    """The user and system CPU seconds *pid* has used, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
