"""The journal writer task: debounced writes, durable writes, failures (virtual time)."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from uenvfs.core.errors import JournalWriteFailed
from uenvfs.core.metrics import Metrics
from uenvfs.manager import journal
from uenvfs.manager.journal import Journal, MountRecord
from uenvfs.manager.journal_writer import DELAY, JournalWriter

Start = Callable[..., JournalWriter]


class Snapshots:
    """The state to journal: one record per call, so each write can be told apart."""

    def __init__(self) -> None:
        self.taken = 0

    def __call__(self) -> Journal:
        self.taken += 1
        return Journal({"a": MountRecord(f"/images/{self.taken}.sqfs", "/state/mnt/a")})


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    async with trio.open_nursery() as nursery:

        def start(path: Path = tmp_path / "journal.json", in_thread: bool = False) -> JournalWriter:
            writer = JournalWriter(path, Snapshots(), Metrics(), in_thread=in_thread)
            nursery.start_soon(writer.run)
            return writer

        yield start
        nursery.cancel_scope.cancel()


def written(writer: JournalWriter) -> str | None:
    state = journal.load(writer.path)
    return None if state is None else state.mounts["a"].image_path


async def test_soon_gathers_a_burst_into_one_write(
    start: Start, autojump_clock: trio.testing.MockClock
) -> None:
    writer = start()
    assert [writer.soon() for _ in range(5)] == [1, 2, 3, 4, 5]
    await trio.sleep(DELAY / 2)
    assert written(writer) is None  # not yet: a mount does not wait for the fsync
    await trio.sleep(DELAY)
    assert written(writer) == "/images/1.sqfs"
    assert writer.written == 5


async def test_durable_waits_for_the_disk_and_skips_the_delay(
    start: Start, autojump_clock: trio.testing.MockClock
) -> None:
    writer = start()
    began = trio.current_time()
    await writer.durable()
    assert trio.current_time() - began < DELAY
    assert written(writer) == "/images/1.sqfs"
    writer.soon()
    await writer.durable()  # covers the change before it too
    assert writer.written == writer.wanted == 3
    assert written(writer) == "/images/2.sqfs"


async def test_durable_in_a_worker_thread(start: Start) -> None:
    writer = start(in_thread=True)
    with trio.fail_after(10):
        await writer.durable()
    assert written(writer) == "/images/1.sqfs"


async def test_a_failed_write_fails_the_durable_wait_and_is_counted_not_fatal(
    start: Start, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    writer = start(tmp_path / "missing" / "journal.json")
    for _ in range(2):
        with pytest.raises(JournalWriteFailed, match="No such file or directory"):
            await writer.durable()
    assert writer.metrics.value("uenvfs_journal_errors_total") == 2
    (tmp_path / "missing").mkdir()
    await writer.durable()  # the writer goes on: the next write succeeds
    assert written(writer) == "/images/3.sqfs"


def test_a_failed_save_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        journal.save(tmp_path / "journal.json", Journal())
    assert list(tmp_path.iterdir()) == []


def test_save_writes_now(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path / "journal.json", Snapshots(), Metrics())
    writer.save()
    assert written(writer) == "/images/1.sqfs"
    writer.save(Journal())
    assert journal.load(writer.path) == Journal()
