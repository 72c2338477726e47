"""What a server hands the next one at a restart (server/handover.py), in virtual time with a fake
backend: the settings whole, the running hold timers, failures; and the document of the
version before this one reads the same."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from uenvfs.core.config import Config
from uenvfs.core.control import parse_line
from uenvfs.core.errors import MountFailed
from uenvfs.core.state import GRACE, Scanned
from uenvfs.image.catalog import Catalog
from uenvfs.manager import journal
from uenvfs.server import handover

from ..fakes import FakeBackend
from ..parts import Parts, make_parts

Server = Callable[[], AbstractAsyncContextManager[Parts]]


@pytest.fixture
def server(tmp_path: Path) -> Server:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("held", "idle", "broken", "never-used"):
        (images / f"{name}.sqfs").write_bytes(b"hsqs" + name.encode())
    config = Config(images=(images,), state_dir=tmp_path / "state", hold_time=300.0,
                    validate=False)

    @asynccontextmanager
    async def start() -> AsyncIterator[Parts]:
        backend = FakeBackend()
        backend.broken.add("broken.sqfs")
        catalog = Catalog([images])
        catalog.refresh()
        parts = make_parts(config, backend, catalog)
        async with trio.open_nursery() as nursery:
            await nursery.start(parts.manager.run)
            yield parts
            nursery.cancel_scope.cancel()

    return start


async def run(parts: Parts, line: str) -> str:
    return await parts.executor.execute(parse_line(line))


async def recover(parts: Parts, *names: str) -> None:
    """What recovery does at a start: the settings from the journal, and the backing mounts
    there again."""
    found = journal.load(parts.manager.config.journal_path)
    if found is not None:
        parts.settings.restore(found.settings)
    for name in names:
        await parts.manager.ensure_mounted(name)


async def test_settings_timers_and_failures_are_carried_over(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    async with server() as old:
        await recover(old, "held", "idle")
        await run(old, "acquire held job-1")
        await run(old, "hold-time 120 idle")
        await run(old, "hold-time 5 never-used")
        await run(old, "hold-time 200")
        await run(old, "emergency on")
        with pytest.raises(MountFailed):
            await old.manager.ensure_mounted("broken")
        await trio.sleep(20)
        document = handover.capture(old.manager, old.settings)
        before = {m["name"]: m for m in old.images.status()["mounts"]}
    assert sorted(document["images"]) == ["broken", "held", "idle", "never-used"]
    assert document["images"]["never-used"]["phase"] == "unmounted"
    async with server() as new:
        await recover(new, "held", "idle")
        handover.apply(new.manager, new.settings, document)
        after = {m["name"]: m for m in new.images.status()["mounts"]}
        settings = new.settings
        assert (settings.hold_time, settings.hold_time_set, settings.emergency) == (
            200.0, 200.0, True)
        assert settings.hold_times == {"idle": 120.0, "never-used": 5.0}
        # The hold timer ran on: 120 s of its own, 20 s of them gone.
        assert after["idle"]["hold_remaining"] == pytest.approx(100.0, abs=0.1)
        assert after["idle"]["hold_remaining"] <= before["idle"]["hold_remaining"]
        assert after["held"]["allocations"] == before["held"]["allocations"]
        assert (after["broken"]["state"], after["broken"]["error"]) == (
            "failed", before["broken"]["error"])
        assert await run(new, "hold-time 1 never-used") == "hold time 1 s"  # still a name


async def test_namespace_uses_and_trees_in_their_grace_are_carried_over(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    async with server() as old:
        await recover(old, "held")
        counts = old.manager.counts
        counts.scanned({"held": {"job-2": Scanned(cwd=1, namespaces=2)}})
        counts.tree_handed("held", "job-3")  # not attached yet
        await trio.sleep(4)
        document = handover.capture(old.manager, old.settings)
        before = old.images.status()["mounts"][0]["allocations"]
    assert document["images"]["held"]["namespaces"] == {"job-2": 2, "job-3": 1}
    assert document["images"]["held"]["handed"] == {"job-3": pytest.approx(GRACE - 4)}
    async with server() as new:
        await recover(new, "held")
        handover.apply(new.manager, new.settings, document)
        assert new.images.status()["mounts"][0]["allocations"] == before == {
            "job-2": {"opens": 0, "acquired": False, "cwd": 1, "namespaces": 2},
            "job-3": {"opens": 0, "acquired": False, "cwd": 0, "namespaces": 1}}
        # The new server's first scan finds job-2's namespaces; job-3's tree keeps its
        # grace time, counted from the handout, not from the restart.
        counts = new.manager.counts
        counts.scanned({"held": {"job-2": Scanned(namespaces=2)}})
        assert new.manager.registry["held"].users.keys() == {"job-2", "job-3"}
        await trio.sleep(GRACE - 4)
        counts.scanned({"held": {"job-2": Scanned(namespaces=2)}})
        assert new.manager.registry["held"].users.keys() == {"job-2"}


# What the version before this one captured (its per-image hold times inside "images"; no
# namespaces, no trees handed out), and the one before that, which journaled no hold time
# ("hold_time_set" missing).
PREVIOUS: dict[str, Any] = {
    "config": None, "hold_time": 200.0, "hold_time_set": 200.0, "emergency": True,
    "verify": {"at": "2026-01-01T00:00:00Z", "differences": []},
    "images": {
        "idle": {"hold_time": 120.0, "phase": "holding", "hold_left": 50.0, "error": None,
                 "retry_in": 0.0, "acquired": [], "cwd": {}},
        "held": {"hold_time": None, "phase": "mounted", "hold_left": None, "error": None,
                 "retry_in": 0.0, "acquired": ["job-2"], "cwd": {}}}}


async def test_the_previous_versions_document_reads_the_same(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    async with server() as new:
        await recover(new, "idle", "held")
        handover.apply(new.manager, new.settings, PREVIOUS)
        status = new.images.status()
        assert (new.settings.hold_time, new.settings.hold_times) == (300.0, {"idle": 120.0})
        assert status["verify"] == PREVIOUS["verify"]
        mounts = {m["name"]: m for m in status["mounts"]}
        assert mounts["idle"]["hold_remaining"] == pytest.approx(50.0)
        assert mounts["held"]["allocations"] == {
            "job-2": {"opens": 0, "acquired": True, "cwd": 0, "namespaces": 0}}
        # Its capture is the same document, key for key, plus the namespaces.
        captured = handover.capture(new.manager, new.settings)
        assert captured.keys() == PREVIOUS.keys()
        assert captured["images"].keys() == PREVIOUS["images"].keys()
        assert captured["images"]["idle"].keys() == (PREVIOUS["images"]["idle"].keys()
                                                     | {"namespaces", "handed"})
    older = {k: v for k, v in PREVIOUS.items() if k != "hold_time_set"}
    async with server() as new:
        await recover(new, "idle")
        handover.apply(new.manager, new.settings, older)
        assert (new.settings.hold_time, new.settings.hold_time_set) == (200.0, None)
