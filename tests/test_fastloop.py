"""The facade that pyfuse3's request loop runs on: a lock and a poll-first wait_readable."""

from __future__ import annotations

import os

import pyfuse3
import trio
import trio.testing

from uenvfs import fastloop


async def test_lock_excludes_and_hands_over_in_order() -> None:
    lock = fastloop.Lock()
    inside: list[str] = []
    order: list[str] = []

    async def worker(name: str) -> None:
        async with lock:
            inside.append(name)
            assert len(inside) == 1, inside
            order.append(name)
            await trio.sleep(0.01)
            inside.remove(name)

    async with trio.open_nursery() as nursery:
        for name in "abcd":
            nursery.start_soon(worker, name)
            await trio.testing.wait_all_tasks_blocked()
    assert order == list("abcd")
    async with lock:  # free again
        pass


async def test_wait_readable_returns_at_once_but_yields_after_a_burst() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        ran: list[int] = []
        calls = 0

        async def other() -> None:
            ran.append(calls)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            while not ran and calls < 10 * fastloop.BURST:
                await fastloop.wait_readable(r)  # readable: mostly no checkpoint
                calls += 1
        # Another task waits a burst or two: at the checkpoint trio may run us first once
        # more (it reverses its run queue at random, on purpose), then the other task runs
        # at our next checkpoint.
        assert ran
        assert ran[0] <= 2 * fastloop.BURST + 2
    finally:
        os.close(r)
        os.close(w)


async def test_wait_readable_waits_through_trio_when_nothing_is_there() -> None:
    r, w = os.pipe()
    try:
        async def write_later() -> None:
            await trio.sleep(0.05)
            os.write(w, b"x")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_later)
            with trio.fail_after(5):
                await fastloop.wait_readable(r)
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)


def test_install_keeps_the_rest_of_trio() -> None:
    original = pyfuse3.trio  # type: ignore[attr-defined]
    try:
        fastloop.install()
        facade = pyfuse3.trio  # type: ignore[attr-defined]
        assert facade.Lock is fastloop.Lock
        assert facade.lowlevel.wait_readable is fastloop.wait_readable
        assert facade.open_nursery is trio.open_nursery
        assert facade.lowlevel.current_task is trio.lowlevel.current_task
        assert facade.ClosedResourceError is trio.ClosedResourceError
    finally:
        pyfuse3.trio = original  # type: ignore[attr-defined]
