"""The hold timer task, in virtual time with a bare registry (no manager, no mounts)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from uenvfs.core.registry import Registry
from uenvfs.core.settings import Settings
from uenvfs.core.state import Image, Phase
from uenvfs.manager.hold_timer import HoldTimer


@pytest.fixture
async def timer() -> AsyncIterator[tuple[HoldTimer, list[str]]]:
    unmounted: list[str] = []
    timer = HoldTimer(Registry(Settings(10.0)), unmounted.append)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        await trio.testing.wait_all_tasks_blocked()
        yield timer, unmounted
        nursery.cancel_scope.cancel()


def mount(timer: HoldTimer, name: str) -> Image:
    image = timer.registry[name]
    image.begin_mount(trio.current_time())
    image.mounted(trio.current_time())
    timer.wake_for(image)
    return image


async def test_unmounts_after_the_hold_time(
    timer: tuple[HoldTimer, list[str]], autojump_clock: trio.testing.MockClock
) -> None:
    hold, unmounted = timer
    assert hold.sleeping_until == math.inf  # nothing to wait for
    image = mount(hold, "a")
    await trio.sleep(9.9)
    assert unmounted == []
    await trio.sleep(0.2)
    assert unmounted == ["a"]
    assert image.phase is Phase.UNMOUNTING
    assert hold.sleeping_until == math.inf


async def test_a_use_stops_the_timer_and_its_end_restarts_it(
    timer: tuple[HoldTimer, list[str]], autojump_clock: trio.testing.MockClock
) -> None:
    hold, unmounted = timer
    image = mount(hold, "a")
    await trio.sleep(5)
    use = image.open("alloc-1", trio.current_time())  # no wake-up needed: nothing will be due
    await trio.sleep(100)
    assert unmounted == []
    image.close(use, trio.current_time())
    hold.wake_for(image)
    await trio.sleep(9.9)
    assert unmounted == []
    await trio.sleep(0.2)
    assert unmounted == ["a"]


async def test_wakes_only_for_a_sooner_deadline(
    timer: tuple[HoldTimer, list[str]], autojump_clock: trio.testing.MockClock
) -> None:
    hold, unmounted = timer
    mount(hold, "a")
    await trio.testing.wait_all_tasks_blocked()
    assert hold.sleeping_until == pytest.approx(trio.current_time() + 10)
    await trio.sleep(5)
    mount(hold, "b")  # runs out after "a": the timer sleeps on
    await trio.testing.wait_all_tasks_blocked()
    assert hold.sleeping_until == pytest.approx(trio.current_time() + 5)
    hold.registry.settings.set_hold_time(1, "b")
    hold.wake()  # a hold time shrank
    await trio.sleep(1.1)
    assert unmounted == ["b"]
    await trio.sleep(4)
    assert unmounted == ["b", "a"]


async def test_global_hold_time_change_applies_to_running_timers(
    timer: tuple[HoldTimer, list[str]], autojump_clock: trio.testing.MockClock
) -> None:
    hold, unmounted = timer
    mount(hold, "a")
    await trio.sleep(3)
    hold.registry.settings.set_hold_time(2)
    hold.wake()
    await trio.sleep(0.01)
    assert unmounted == ["a"]
