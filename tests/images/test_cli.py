"""The command line itself: --version, and a reader that goes away (`uenvfs images | head`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from uenvfs import __version__
from uenvfs.client import exits


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "uenvfs", "--version"], capture_output=True,
                          text=True, check=False, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"uenvfs {__version__}\n")


def test_a_reader_that_goes_away_gets_no_error_message(tmp_path: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # gone before uenvfs writes: its first write gets EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "uenvfs", "images", "--images",
                               str(tmp_path), "--config", os.devnull], stdout=write,
                              stderr=subprocess.PIPE, text=True, check=False, timeout=60)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (exits.BROKEN_PIPE, "")
