#!/usr/bin/env python3
"""What `uenvfs run` costs a command, against running the command directly.

Runs a real `uenvfs serve` on a scratch image and times, ROUNDS times each (after a warm-up),
interleaved: `cat` of a file of the image at its served path, the same `cat` through
`uenvfs run` as root and as nobody (then through a user namespace), and an empty Python
start for scale. Prints the median and the maximum of each.

    scripts/runcost.py [--rounds 20]

Needs root, /dev/fuse and gensquashfs; leaves no mount behind.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mounts import clean_up, is_mounted, wait_until  # noqa: E402

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd="/")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="uenvfs-runcost-"))
    work.chmod(0o755)  # nobody must reach the mount point
    images, mountpoint, target = work / "images", work / "mnt", work / "ue"
    for directory in (work / "src", images, target):
        directory.mkdir()
    (work / "src/f").write_text("hello\n")
    subprocess.run(["gensquashfs", "-q", "-D", str(work / "src"), str(images / "img.sqfs")],
                   check=True)
    (work / "none.toml").write_text("")
    command = [sys.executable, "-m", "uenvfs", "serve", "--mountpoint", str(mountpoint),
               "--images", str(images), "--state-dir", str(work / "state"),
               "--config", str(work / "none.toml")]
    log = (work / "uenvfs.log").open("wb")
    keeper = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                              cwd=REPO, start_new_session=True)
    run = [sys.executable, "-m", "uenvfs", "run", "--mountpoint", str(mountpoint),
           f"img:{target}", "--", "cat", f"{target}/f"]
    cases = {
        "cat MOUNTPOINT/img/f (directly)": ["cat", str(mountpoint / "img/f")],
        "uenvfs run img -- cat (root)": run,
        "uenvfs run img -- cat (nobody)": [*NOBODY, *run],
        "python -c pass (for scale)": [sys.executable, "-c", "pass"],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    try:
        wait_until(lambda: is_mounted(mountpoint, "fuse.uenvfs")
                   and (mountpoint / ".status").exists(), 30, "uenvfs to serve")
        for _ in range(3):  # warm-up: the image mounted, the code in the page cache
            for case in cases.values():
                timed(case)
        for _ in range(args.rounds):
            for name, case in cases.items():
                times[name].append(timed(case))
    finally:
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(60)
        log.close()
        left = clean_up(work)
    direct = statistics.median(times["cat MOUNTPOINT/img/f (directly)"])
    print(f"{'command':34} {'median':>9} {'max':>9} {'minus direct':>13}  ({args.rounds} runs)")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:34} {median * 1000:7.1f}ms {max(samples) * 1000:7.1f}ms "
              f"{(median - direct) * 1000:+11.1f}ms")
    if left:
        print("left behind: " + ", ".join(left))
    else:
        shutil.rmtree(work)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
