#!/usr/bin/env python3
"""How long jobs wait when the uenvfs server crashes (kill -9) or is restarted.

Runs a real `uenvfs serve` on a scratch image, and a prober that opens, reads and closes a
file of the image in a loop (every open reaches the server). Kills the server CYCLES times,
then restarts it (`uenvfs restart`) CYCLES times, and reports for each the longest gap between
two answers of the prober around the event: how long jobs waited. No request may fail.

    scripts/pause.py [--cycles 20]

Needs root, /dev/fuse and gensquashfs; leaves no mount behind.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mounts import clean_up, is_mounted, wait_until  # noqa: E402


class Prober(threading.Thread):
    """Opens, reads and closes *path* in a loop; keeps the time of every answer."""

    def __init__(self, path: Path, expected: bytes) -> None:
        super().__init__(daemon=True)
        self.path, self.expected = path, expected
        self.answers: list[float] = []
        self.failures: list[str] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                with open(self.path, "rb") as f:
                    data = f.read()
                if data != self.expected:
                    self.failures.append("wrong content")
            except OSError as exc:
                self.failures.append(str(exc))
            self.answers.append(time.monotonic())

    def gap(self, start: float, end: float) -> float:
        """The longest time without an answer between *start* and *end*."""
        times = [start, *(t for t in self.answers if start <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(times))


def server_pid(mountpoint: Path) -> int:
    return int(json.loads((mountpoint / ".status").read_bytes())["server"]["pid"])


def new_server(mountpoint: Path, old: int) -> bool:
    return server_pid(mountpoint) != old


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="uenvfs-pause-"))
    images, mountpoint = work / "images", work / "mnt"
    (work / "src").mkdir()
    images.mkdir()
    content = os.urandom(4096)
    (work / "src/f").write_bytes(content)
    subprocess.run(["gensquashfs", "-q", "-D", str(work / "src"), str(images / "img.sqfs")],
                   check=True)
    command = [sys.executable, "-m", "uenvfs", "serve", "--mountpoint", str(mountpoint),
               "--images", str(images), "--state-dir", str(work / "state"),
               "--config", str(work / "none.toml")]
    (work / "none.toml").write_text("")
    log = (work / "uenvfs.log").open("wb")
    keeper = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                              cwd=REPO, start_new_session=True)
    prober = Prober(mountpoint / "img/f", content)
    results: dict[str, list[float]] = {"crash": [], "restart": []}
    try:
        wait_until(lambda: is_mounted(mountpoint, "fuse.uenvfs")
                   and (mountpoint / ".status").exists(), 30, "uenvfs to serve")
        prober.start()
        wait_until(lambda: prober.answers, 10, "the prober")
        for _ in range(args.cycles):
            time.sleep(0.5)
            old, started = server_pid(mountpoint), time.monotonic()
            os.kill(old, signal.SIGKILL)
            wait_until(functools.partial(new_server, mountpoint, old), 30, "a new server")
            time.sleep(0.3)
            results["crash"].append(prober.gap(started, time.monotonic()))
        for _ in range(args.cycles):
            time.sleep(0.5)
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "uenvfs", "restart", "--mountpoint",
                            str(mountpoint)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            time.sleep(0.3)
            results["restart"].append(prober.gap(started, time.monotonic()))
    finally:
        prober.running = False
        prober.join(10)
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(60)
        log.close()
        left = clean_up(work)
    for kind, pauses in results.items():
        if pauses:
            print(f"{kind}: jobs waited {statistics.median(pauses) * 1000:.0f} ms (median), "
                  f"{max(pauses) * 1000:.0f} ms (max) over {len(pauses)} cycles")
    print(f"prober: {len(prober.answers)} answers, {len(prober.failures)} failures"
          + (f" ({prober.failures[:3]})" if prober.failures else ""))
    if left:
        print("left behind: " + ", ".join(left))
    else:
        shutil.rmtree(work)
    return 1 if prober.failures or left else 0


if __name__ == "__main__":
    sys.exit(main())
