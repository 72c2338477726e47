"""The mount manager's timers, concurrency and commands, in virtual time with a fake backend."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from uenvfs.core.config import Config
from uenvfs.core.control import COMMANDS, parse_line
from uenvfs.core.errors import CommandError, MountFailed
from uenvfs.core.interfaces import NoListener
from uenvfs.core.state import Phase
from uenvfs.image.catalog import Catalog
from uenvfs.manager.executor import HANDLERS
from uenvfs.manager.manager import Manager

from ..fakes import FakeBackend
from ..parts import Parts, make_parts


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Parts, FakeBackend]]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "broken"):
        (images / f"{name}.sqfs").write_bytes(b"hsqs" + name.encode())
    backend = FakeBackend()
    backend.broken.add("broken.sqfs")
    catalog = Catalog([images])
    catalog.refresh()
    config = Config(images=(images,), state_dir=tmp_path / "state", hold_time=60.0,
                    validate=False)
    parts = make_parts(config, backend, catalog)
    async with trio.open_nursery() as nursery:
        await nursery.start(parts.manager.run)
        yield parts, backend
        check_mounts(parts.manager)
        nursery.cancel_scope.cancel()


def check_mounts(manager: Manager) -> None:
    """One answer to "mounted": `mounts` holds exactly the images that serve."""
    images = list(manager.registry)
    assert set(manager.mounts) == {i.name for i in images if i.is_mounted}
    assert set(manager._unmounting) == {i.name for i in images if i.phase is Phase.UNMOUNTING}


async def run(parts: Parts, line: str) -> str:
    return await parts.executor.execute(parse_line(line))


async def test_hold_timer_unmounts_after_the_hold_time(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, backend = env
    manager = parts.manager
    await run(parts, "acquire a alloc-1")
    assert manager.registry["a"].phase is Phase.MOUNTED
    await trio.sleep(3600)
    assert manager.registry["a"].phase is Phase.MOUNTED  # in use: no timer
    await run(parts, "release alloc-1")
    released = trio.current_time()
    await trio.sleep(59.9)
    assert manager.registry["a"].phase is Phase.HOLDING
    status = parts.images.status()["mounts"]
    assert status[0]["hold_remaining"] == pytest.approx(0.1, abs=0.01)
    await trio.sleep(0.2)
    assert manager.registry["a"].phase is Phase.UNMOUNTED
    assert backend.table == {}
    assert trio.current_time() - released < 60.3


async def test_new_use_cancels_the_timer(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, backend = env
    manager = parts.manager
    await manager.ensure_mounted("a")  # a lookup: mounted, idle, timer runs
    await trio.sleep(50)
    use = parts.images.open("a", "alloc-1")
    await trio.sleep(100)
    assert manager.registry["a"].phase is Phase.MOUNTED
    parts.images.close("a", use)
    await trio.sleep(59)
    assert backend.count("unmount") == 0
    await trio.sleep(2)
    assert backend.count("unmount") == 1


async def test_concurrent_first_accesses_mount_once(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, backend = env
    manager = parts.manager
    backend.delay = 1.0
    mounts = []

    async def access() -> None:
        mounts.append(await manager.ensure_mounted("a"))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(access)
    assert backend.count("mount") == 1
    assert len({id(m) for m in mounts}) == 1


async def test_cancelled_caller_leaves_no_half_mount(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, backend = env
    manager = parts.manager
    backend.delay = 5.0
    with trio.move_on_after(1):
        await manager.ensure_mounted("a")
    assert manager.registry["a"].phase is Phase.MOUNTING
    await trio.sleep(10)
    assert manager.registry["a"].phase is Phase.HOLDING  # the mount task finished anyway
    assert (await manager.ensure_mounted("a")).source == "/dev/fake1"


async def test_failed_mount_is_negatively_cached(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, backend = env
    manager = parts.manager
    for _ in range(100):
        with pytest.raises(MountFailed, match="bad magic"):
            await manager.ensure_mounted("broken")
    assert backend.count("mount") == 1
    doc = parts.images.status()["mounts"][0]
    assert doc["state"] == "failed"
    assert "bad magic" in doc["error"]
    await trio.sleep(10)
    with pytest.raises(MountFailed):
        await manager.ensure_mounted("broken")
    assert backend.count("mount") == 2


async def test_hold_time_change_applies_to_running_timers(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, _ = env
    manager = parts.manager
    await manager.ensure_mounted("a")
    await manager.ensure_mounted("b")
    await run(parts, "hold-time 5 a")
    await trio.sleep(6)
    assert manager.registry["a"].phase is Phase.UNMOUNTED
    assert manager.registry["b"].phase is Phase.HOLDING
    await run(parts, "hold-time 1")
    await trio.sleep(0.1)
    assert manager.registry["b"].phase is Phase.UNMOUNTED


async def test_expire_unmounts_idle_images_only(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, _ = env
    manager = parts.manager
    await run(parts, "acquire a alloc-1")
    await manager.ensure_mounted("b")
    assert await run(parts, "expire") == "expired 1 images"
    assert manager.registry["b"].phase is Phase.UNMOUNTED
    assert manager.registry["a"].phase is Phase.MOUNTED
    with pytest.raises(CommandError) as info:
        await run(parts, "expire a")
    assert info.value.errno == errno.EPERM
    assert await run(parts, "expire b") == "expired 0 images"


async def test_errors_of_commands(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, _ = env
    manager = parts.manager
    cases = {
        "acquire nosuch alloc-1": errno.ENOENT,
        "acquire broken alloc-1": errno.EIO,
        "release alloc-1": errno.ENOENT,
        "release alloc-1 a": errno.ENOENT,
        "expire nosuch": errno.ENOENT,
        "hold-time 3 nosuch": errno.ENOENT,
        "force-unmount a": errno.EPERM,
    }
    for line, code in cases.items():
        with pytest.raises(CommandError) as info:
            await run(parts, line)
        assert info.value.errno == code, line
    assert manager.registry.allocations() == set()


async def test_force_unmount_in_emergency(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, backend = env
    manager = parts.manager
    killed: list[str] = []

    class Listener(NoListener):
        async def force_unmounted(self, name: str) -> None:
            killed.append(name)

    manager.listen(Listener())
    await run(parts, "acquire a alloc-1")
    parts.images.open("a", "alloc-2")
    await run(parts, "emergency on")
    assert parts.images.status()["emergency"] is True
    await run(parts, "force-unmount a")
    assert killed == ["a"]
    assert backend.table == {}
    doc = parts.images.status()["mounts"][0]
    assert (doc["state"], doc["error"], doc["refcount"]) == ("failed", "force-unmounted", 0)
    await manager.ensure_mounted("a")  # used again: mounts at once, no negative cache
    assert manager.registry["a"].phase is Phase.HOLDING
    assert manager.registry["a"].error is None


async def test_busy_unmount_falls_back_to_lazy(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, backend = env
    manager = parts.manager
    mount = await manager.ensure_mounted("a")
    backend.busy.add(mount.backing)
    await run(parts, "expire")
    assert backend.calls[-2:] == [("unmount", "a"), ("unmount-lazy", "a")]
    assert manager.registry["a"].phase is Phase.UNMOUNTED


async def test_reconcile_keeps_only_live_allocations(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, _ = env
    manager = parts.manager
    await run(parts, "acquire a alloc-1")
    await run(parts, "acquire a alloc-2")
    await run(parts, "acquire b alloc-3")
    await run(parts, "reconcile alloc-2")
    assert manager.registry.allocations() == {"alloc-2"}
    assert manager.registry["b"].phase is Phase.HOLDING


async def test_owners_are_known_for_allocations_in_use_only(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, _ = env
    manager = parts.manager
    counts, owners = manager.counts, manager.owners
    await run(parts, "acquire a slurm-1 1000")
    await run(parts, "acquire b slurm-1")  # without a uid: the owner stays
    assert owners.owner("slurm-1") == 1000
    journaled = manager.journal.snapshot().mounts
    assert journaled["a"].owners == journaled["b"].owners == {"slurm-1": 1000}
    await run(parts, "acquire a slurm-1 1001")  # the resource manager's latest word
    assert owners.owner("slurm-1") == 1001
    await run(parts, "release slurm-1 a")
    assert owners.owner("slurm-1") == 1001  # it still uses b
    await run(parts, "release slurm-1")
    assert owners.owner("slurm-1") is None

    # An owner learned from a process in the allocation's cgroup goes with its last use.
    first = counts.open("a", "job-2")
    owners.learn("job-2", 2000, "a process in its cgroup")
    second = counts.open("b", "job-2")
    counts.close("a", first)
    assert owners.owner("job-2") == 2000
    counts.close("b", second)
    assert owners.owner("job-2") is None

    await run(parts, "acquire a job-3 3000")
    await run(parts, "acquire a job-4 4000")
    await run(parts, "reconcile job-4")
    assert (owners.owner("job-3"), owners.owner("job-4")) == (None, 4000)
    assert len(owners) == 1


def test_every_command_has_a_handler() -> None:
    assert set(HANDLERS) == set(COMMANDS.values())


async def test_an_image_being_unmounted_no_longer_serves(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, backend = env
    manager = parts.manager
    backend.delay = 1.0
    mount = await manager.ensure_mounted("a")
    assert parts.images.mounted("a") is mount
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.expire_idle)
        await trio.sleep(0.5)
        assert manager.registry["a"].phase is Phase.UNMOUNTING
        assert parts.images.mounted("a") is None
        check_mounts(manager)
        assert "a" in manager.journal.snapshot().mounts  # still mounted until detached
        assert parts.images.status()["mounts"][0]["mounted_at"] is not None
    assert parts.images.mounted("a") is None
    assert "a" not in manager.journal.snapshot().mounts


async def test_failed_unmount_serves_again_and_is_retried(
    env: tuple[Parts, FakeBackend], autojump_clock: trio.testing.MockClock
) -> None:
    parts, backend = env
    manager = parts.manager
    mount = await manager.ensure_mounted("a")
    backend.stuck.add(mount.backing)
    assert await run(parts, "expire") == "expired 1 images"
    assert manager.registry["a"].phase is Phase.HOLDING
    assert "operation not permitted" in (manager.registry["a"].error or "")
    assert parts.images.mounted("a") is mount
    check_mounts(manager)
    backend.stuck.clear()
    await trio.sleep(60.1)  # the hold timer retries
    assert manager.registry["a"].phase is Phase.UNMOUNTED
    assert parts.images.mounted("a") is None
