"""The facade that pyfuse3's request loop runs on (a lock and a poll-first wait_readable), how
it is put in place and taken away, and the check that keeps it off an unknown pyfuse3 or trio."""

from __future__ import annotations

import os
import threading
import types

import pyfuse3
import pytest
import trio
import trio.testing

from uenvfs.fuse import fastloop

from ..support import Daemon


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


def test_installed_keeps_the_rest_of_trio() -> None:
    with fastloop.installed() as active:
        assert active
        facade = pyfuse3.trio  # type: ignore[attr-defined]
        assert facade.Lock is fastloop.Lock
        assert facade.lowlevel.wait_readable is fastloop.wait_readable
        assert facade.open_nursery is trio.open_nursery
        assert facade.lowlevel.current_task is trio.lowlevel.current_task
        assert facade.ClosedResourceError is trio.ClosedResourceError
        assert fastloop._poller.linger == fastloop.LINGER


def test_installed_restores_what_it_replaced_also_on_error() -> None:
    poller = fastloop._poller
    assert pyfuse3.trio is trio  # type: ignore[attr-defined]
    with fastloop.installed(linger=0.002):
        assert pyfuse3.trio is not trio  # type: ignore[attr-defined]
        assert fastloop._poller.linger == 0.002
    assert pyfuse3.trio is trio  # type: ignore[attr-defined]
    assert fastloop._poller is poller

    def fail_inside() -> None:
        with fastloop.installed(linger=0.0):
            assert pyfuse3.trio is not trio  # type: ignore[attr-defined]
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_inside()
    assert pyfuse3.trio is trio  # type: ignore[attr-defined]
    assert fastloop._poller is poller


def test_the_installed_pyfuse3_and_trio_are_known() -> None:
    assert pyfuse3.__version__ in fastloop.KNOWN_PYFUSE3
    assert fastloop.unsupported(pyfuse3, trio) is None


def fake_pyfuse3(version: str, trio_module: object = trio) -> types.ModuleType:
    fake = types.ModuleType("pyfuse3")
    fake.__version__ = version  # type: ignore[attr-defined]
    fake.trio = trio_module  # type: ignore[attr-defined]
    return fake


def test_an_unknown_pyfuse3_is_named_in_one_line() -> None:
    reason = fastloop.unsupported(fake_pyfuse3("3.6.0"), trio)
    assert reason is not None
    assert "pyfuse3 3.6.0 is not a release" in reason
    assert "\n" not in reason
    assert fastloop.unsupported(types.ModuleType("pyfuse3"), trio) is not None  # no version
    for version in fastloop.KNOWN_PYFUSE3:
        assert fastloop.unsupported(fake_pyfuse3(version), trio) is None


def test_a_pyfuse3_that_does_not_reach_trio_through_its_attribute_is_unsupported() -> None:
    asyncio_mode = fake_pyfuse3(pyfuse3.__version__, types.ModuleType("pyfuse3.asyncio"))
    reason = fastloop.unsupported(asyncio_mode, trio)
    assert reason is not None
    assert "pyfuse3.trio" in reason


class Without(types.ModuleType):
    """*real* as `getattr` sees it, but for the attribute at the dotted *path*."""

    def __init__(self, real: object, path: str) -> None:
        super().__init__(getattr(real, "__name__", "fake"))
        self._real = real
        self._path = path

    def __getattr__(self, name: str) -> object:
        head, _, rest = self._path.partition(".")
        if name == head and not rest:
            raise AttributeError(name)
        value = getattr(self._real, name)
        return Without(value, rest) if name == head else value


@pytest.mark.parametrize("part", fastloop.TRIO_PARTS)
def test_a_trio_without_a_part_fastloop_uses_is_unsupported(part: str) -> None:
    fake_trio = Without(trio, part)
    reason = fastloop.unsupported(fake_pyfuse3(pyfuse3.__version__, fake_trio), fake_trio)
    assert reason == f"trio {trio.__version__} has no trio.{part}"


def test_installed_over_an_unknown_pyfuse3_warns_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pyfuse3, "__version__", "3.6.0")
    poller = fastloop._poller
    with fastloop.installed() as active:
        assert not active
        assert pyfuse3.trio is trio  # type: ignore[attr-defined]
        assert fastloop._poller is poller
    assert pyfuse3.trio is trio  # type: ignore[attr-defined]
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith("pyfuse3 3.6.0 is not a release")
    assert record.getMessage().endswith("serving with pyfuse3's own request loop (slower)")


@pytest.mark.fuse
def test_serve_over_an_unknown_pyfuse3_warns_and_serves(daemon: Daemon) -> None:
    """`uenvfs serve` with a pyfuse3 release fastloop does not know: one warning line, then
    the same service on pyfuse3's own loop."""
    hook = daemon.root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import pyfuse3\npyfuse3.__version__ = '3.6.0'\n")
    daemon.env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    daemon.expect(r"WARNING uenvfs\.fuse\.fastloop: pyfuse3 3\.6\.0 is not a release .*: "
                  r"serving with pyfuse3's own request loop \(slower\)$")
    daemon.image("tools", {"README": "read me\n"})
    daemon.start()
    assert (daemon.mountpoint / "tools" / "README").read_text() == "read me\n"
    daemon.wait_idle("tools")
    assert daemon.stop() == 0
    warnings = [line for line in daemon.log().splitlines() if "WARNING" in line]
    assert len(warnings) == 1, warnings


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
