"""The facade that pyfuse3's request loop runs on: a lock and a poll-first wait_readable."""

from __future__ import annotations

import os
import threading

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


async def test_a_worker_that_comes_back_without_yielding_keeps_the_lock() -> None:
    """pyfuse3's pattern: release, answer the request inline, take the lock again. The
    parked worker must not be woken for that (it would cost a scheduler pass each time)."""
    lock = fastloop.Lock()
    woken: list[str] = []

    async def parked() -> None:
        async with lock:
            woken.append("parked")

    await lock.__aenter__()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(100):  # release and retake, never yielding in between
            await lock.__aexit__()
            await lock.__aenter__()
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        await lock.__aexit__()
        assert woken == []  # not yet: we have not yielded since
        await trio.testing.wait_all_tasks_blocked()  # yields: the lock goes to the parked one
        assert woken == ["parked"]


async def test_a_worker_that_yields_after_releasing_hands_the_lock_over() -> None:
    lock = fastloop.Lock()
    events: list[str] = []

    async def parked() -> None:
        async with lock:
            events.append("parked has it")

    async def releaser() -> None:
        await lock.__aenter__()
        await trio.testing.wait_all_tasks_blocked()  # the other one parks
        await lock.__aexit__()
        events.append("released")
        await trio.sleep(0.05)  # a handler that waits for a mount
        events.append("releaser back")
        async with lock:
            events.append("releaser has it")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(releaser)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(parked)
    assert events == ["released", "parked has it", "releaser back", "releaser has it"]


async def test_a_worker_that_ends_after_releasing_hands_the_lock_over() -> None:
    lock = fastloop.Lock()
    got: list[str] = []

    async def leaves() -> None:
        await lock.__aenter__()
        await trio.testing.wait_all_tasks_blocked()
        await lock.__aexit__()

    async def parked() -> None:
        async with lock:
            got.append("parked")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leaves)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(parked)
    assert got == ["parked"]


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


def test_lingering_catches_a_request_that_comes_soon_after() -> None:
    r, w = os.pipe()
    try:
        poller = fastloop._Poller()
        poller.linger = 5.0  # far longer than the writer needs, so the result is certain
        writer = threading.Timer(0.01, os.write, (w, b"x"))
        writer.start()
        assert poller.ready(r)
        writer.join()
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)


def test_without_lingering_only_a_request_already_there_counts() -> None:
    r, w = os.pipe()
    try:
        poller = fastloop._Poller()
        poller.linger = 0.0
        assert not poller.ready(r)
        os.write(w, b"x")
        assert poller.ready(r)
        poller.linger = 0.001
        os.read(r, 1)
        assert not poller.ready(r)  # nothing came during the linger: give up, go to sleep
    finally:
        os.close(r)
        os.close(w)
