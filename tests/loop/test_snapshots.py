"""The content of `.status` and `.metrics`: one snapshot shared while what it shows is the
same, renders bounded in number however many read, each open shown what came before it."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from uenvfs.fuse import snapshots
from uenvfs.fuse.snapshots import MAX_AGE, MIN_GAP, Renderer


class State:
    """What a file shows: a version, and a cost (virtual seconds) to render it."""

    def __init__(self, cost: float = 0.0) -> None:
        self.version = 0
        self.cost = cost
        self.renders: list[float] = []  # when each began

    def build(self) -> dict[str, Any]:
        self.renders.append(trio.current_time())
        return {"version": self.version, "holding": self.version % 2 == 1}

    def encode(self, document: dict[str, Any]) -> bytes:
        return repr(document).encode()


def renderer(state: State, **kwargs: Any) -> Renderer:
    return Renderer(state.build, state.encode, version=lambda: state.version, **kwargs)


async def test_one_snapshot_is_shared_while_what_it_shows_is_the_same(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = State()
    files = renderer(state)
    first = await files.get()
    for _ in range(100):
        assert await files.get() is first  # the very bytes object: no copy per open
    assert len(state.renders) == 1
    state.version = 2
    second = await files.get()
    assert second == b"{'version': 2, 'holding': False}"
    assert len(state.renders) == files.renders == 2


async def test_renders_are_spaced_and_shared_by_the_opens_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = State()
    files = renderer(state)
    got: list[bytes] = []

    async def reader() -> None:
        while trio.current_time() < 1.0:
            state.version += 2  # another job changed what it shows since
            got.append(await files.get())

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(reader)
    # Ten readers in a loop for a second: at most one render per MIN_GAP, each seen by the
    # readers waiting for it (not one per read).
    assert len(state.renders) <= 1.0 / MIN_GAP + 2
    assert len(got) >= 5 * len(state.renders)
    gaps = [b - a for a, b in zip(state.renders, state.renders[1:], strict=False)]
    assert min(gaps) >= MIN_GAP - 1e-9


async def test_an_open_gets_a_render_made_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = State()
    files = renderer(state)
    await files.get()
    state.version = 4  # a change just before an open, within MIN_GAP of the last render
    assert b"'version': 4" in await files.get()  # it waited for the next render


async def test_renders_take_a_bounded_share_of_the_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = State()
    slow = 0.2  # seconds each render takes

    def encode(document: dict[str, Any]) -> bytes:
        autojump_clock.jump(slow)
        return state.encode(document)

    files = Renderer(state.build, encode, version=lambda: state.version)
    while trio.current_time() < 10.0:
        state.version += 2
        await files.get()
    busy = slow * len(state.renders)
    assert busy <= snapshots.DUTY * trio.current_time() + slow


async def test_a_snapshot_showing_hold_times_that_run_is_made_again_when_old(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = State()
    state.version = 1  # "holding": it ages
    files = renderer(state, ages=lambda document: document["holding"])
    first = await files.get()
    await trio.sleep(MAX_AGE / 2)
    assert await files.get() is first
    await trio.sleep(MAX_AGE)
    assert await files.get() is not first
    assert len(state.renders) == 2


async def test_without_a_version_every_open_gets_a_new_render_shared_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = State()
    files = Renderer(state.build, state.encode)
    first = await files.get()
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await files.get())

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(reader)
    assert all(data is got[0] for data in got)
    assert got[0] is not first
    assert len(state.renders) == 2


async def test_a_document_encoded_in_a_worker_thread() -> None:
    state = State()
    files = renderer(state, off_loop=True)
    assert await files.get() == b"{'version': 0, 'holding': False}"
    assert files.now() is await files.get()  # a restoring server gets the same
