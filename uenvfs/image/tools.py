"""Running an external tool (squashfuse_ll, fusermount3, umount, rdsquashfs) with a time limit.

`run` is the one way uenvfs starts such a tool: stdin from /dev/null, stderr captured, stdout
captured or discarded, and a tool still running when its time is over is killed with SIGKILL
(a hung mount helper may ignore SIGTERM). It is async, for the daemon's trio loop; the CLI
calls it through `trio.run`.

The program map (program_map.py) does not run through here: it answers a name lookup, so its
failures are logged in their own words (a timeout is "no answer after 1.0 s"), never raised;
a program map still running when its time is over is killed (SIGKILL) all the same.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..core.errors import MountError, MountFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """A tool that ran to its end. `stdout` is empty when it was discarded."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: str  # decoded, invalid UTF-8 replaced


async def run(
    command: Sequence[str],
    time_limit: float,
    *,
    error: type[MountError] = MountFailed,
    check: bool = False,
    keep_stdout: bool = True,
    package: str = "",
) -> Finished:
    """Run *command*; return how it finished.

    Raises *error* (with the command) if it cannot be started, or if it is still running after
    *time_limit* seconds (it is then killed). With *check*, a non-zero exit status raises
    *error* too, with its stderr. *package* names what provides the tool, for the message when
    it cannot be started.
    """
    argv = [str(a) for a in command]
    log.debug("running %s", " ".join(argv))
    output: dict[str, Any] = (
        {"capture_stdout": True} if keep_stdout else {"stdout": subprocess.DEVNULL})
    try:
        with trio.fail_after(time_limit):
            result = await trio.run_process(
                argv, check=False, capture_stderr=True, stdin=subprocess.DEVNULL,
                deliver_cancel=_kill, **output,
            )
    except trio.TooSlowError:
        raise error(f"{argv[0]} killed after {time_limit:g} s without finishing", argv) from None
    except OSError as exc:
        needed = f" ({package} is needed)" if package else ""
        raise error(f"cannot run {argv[0]}: {exc.strerror}{needed}", argv) from exc
    stderr = result.stderr.decode("utf-8", "replace")
    if check and result.returncode != 0:
        raise error(f"{' '.join(argv)} exited {result.returncode}", argv, stderr)
    return Finished(argv, result.returncode, result.stdout or b"", stderr)


async def _kill(process: trio.Process) -> None:
    process.send_signal(signal.SIGKILL)
