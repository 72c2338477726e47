"""Running an external tool: output, exit status, errors, and the kill when time is over."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from uenvfs.core.errors import MountFailed, UnmountFailed
from uenvfs.image import tools


async def test_output_and_exit_status() -> None:
    result = await tools.run(["sh", "-c", "echo out; echo err >&2; exit 3"], 10)
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", "err\n")
    assert result.argv == ["sh", "-c", "echo out; echo err >&2; exit 3"]


async def test_stdout_discarded_and_stdin_empty() -> None:
    result = await tools.run(["sh", "-c", "cat; echo listing"], 10, keep_stdout=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", "")
    assert (await tools.run(["cat"], 10)).stdout == b""  # stdin is /dev/null: no wait


async def test_check_raises_with_stderr() -> None:
    with pytest.raises(UnmountFailed) as info:
        await tools.run(["sh", "-c", "echo busy >&2; exit 32"], 10, error=UnmountFailed,
                        check=True)
    assert str(info.value) == "sh -c echo busy >&2; exit 32 exited 32: busy"
    assert info.value.command == ["sh", "-c", "echo busy >&2; exit 32"]
    assert info.value.stderr == "busy"


async def test_cannot_run() -> None:
    with pytest.raises(MountFailed) as info:
        await tools.run(["/nonexistent/tool"], 10)
    assert str(info.value) == "cannot run /nonexistent/tool: No such file or directory"
    with pytest.raises(MountFailed) as info:
        await tools.run(["/nonexistent/tool"], 10, package="pkg-ng")
    assert str(info.value).endswith("No such file or directory (pkg-ng is needed)")


async def test_killed_when_time_is_over(tmp_path: Path) -> None:
    """SIGKILL: a tool that ignores SIGTERM is gone as soon as the time is over."""
    pid_file = tmp_path / "pid"
    script = f"trap '' TERM; echo $$ > {pid_file}; exec sleep 60"
    started = time.monotonic()
    with pytest.raises(MountFailed) as info:
        await tools.run(["sh", "-c", script], 0.5)
    assert time.monotonic() - started < 5
    assert str(info.value) == "sh killed after 0.5 s without finishing"
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
