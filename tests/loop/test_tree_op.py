"""The query socket's `tree` op (server/queries.py) on the manager's parts, with a fake backend
and a fake /proc for the caller, in virtual time: what it answers, what it counts for whom, and
its refusals."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from uenvfs.core.config import Config
from uenvfs.core.errors import CommandError
from uenvfs.core.state import GRACE, Phase
from uenvfs.fuse.allocation import AllocationResolver
from uenvfs.image.catalog import Catalog
from uenvfs.kernel import mountinfo
from uenvfs.server.queries import OPS, Caller, Service

from ..fakes import FakeBackend
from ..parts import Parts, make_parts

PID = 4242
DEVICE = os.makedev(7, 1)


@pytest.fixture
async def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[tuple[Service, Parts]]:
    """Images `a` and `broken` (its mount fails); the caller, pid PID, is root's process of
    allocation job-9 (its environment says so)."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "broken"):
        (images / f"{name}.sqfs").write_bytes(b"hsqs" + name.encode())
    proc = tmp_path / "proc" / str(PID)
    proc.mkdir(parents=True)
    (proc / "status").write_text(f"Name:\tjob\nTgid:\t{PID}\nUid:\t0\t0\t0\t0\n")
    (proc / "environ").write_bytes(b"HOME=/root\0PACT_ALLOCATION_ID=job-9\0")
    (proc / "cgroup").write_text("0::/user.slice\n")
    # The fake backend's mounts are in no mount table: say where the device of each is.
    monkeypatch.setattr(mountinfo, "device_at", lambda target: DEVICE)
    backend = FakeBackend()
    backend.broken.add("broken.sqfs")
    catalog = Catalog([images])
    catalog.refresh()
    config = Config(images=(images,), state_dir=tmp_path / "state", hold_time=60.0,
                    validate=False)
    parts = make_parts(config, backend, catalog)
    async with trio.open_nursery() as nursery:
        await nursery.start(parts.manager.run)
        yield Service(parts.images, AllocationResolver(tmp_path / "proc")), parts
        nursery.cancel_scope.cancel()


async def tree(service: Service, image: object) -> dict[str, object]:
    reply = await OPS["tree"](service, Caller(PID, 0, 0), {"op": "tree", "image": image})
    assert reply.fds == []
    return reply.document


async def test_a_tree_is_mounted_handed_out_and_counted(
    service: tuple[Service, Parts], autojump_clock: trio.testing.MockClock
) -> None:
    queries, parts = service
    assert await tree(queries, "a") == {
        "ok": True, "name": "a", "image_path": str(parts.manager.config.images[0] / "a.sqfs"),
        "backing": str(parts.manager.config.backing_root / "a"), "device": "7:1"}
    image = parts.manager.registry["a"]
    # Mounted for it, and used by the caller's allocation until it has bound the tree.
    assert (image.phase, list(image.users)) == (Phase.MOUNTED, ["job-9"])
    assert parts.images.status()["mounts"][0]["device"] == "7:1"
    # A scan that finds no namespace holding it drops the use only after the grace time.
    parts.images.scanned({})
    assert (image.phase, list(image.users)) == (Phase.MOUNTED, ["job-9"])
    await trio.sleep(GRACE + 1)
    parts.images.scanned({})
    assert (image.phase, list(image.users)) == (Phase.HOLDING, [])


async def test_refusals(service: tuple[Service, Parts], monkeypatch: pytest.MonkeyPatch,
                        autojump_clock: trio.testing.MockClock) -> None:
    queries, parts = service
    for image, code in (("nosuch", errno.ENOENT), ("broken", errno.EIO), (7, errno.EINVAL),
                        ("a b", errno.EINVAL), (None, errno.EINVAL)):
        with pytest.raises(CommandError) as refused:
            await tree(queries, image)
        assert refused.value.errno == code, image
    # A backing mount whose device is unknown: nothing to check a bind against.
    monkeypatch.setattr(mountinfo, "device_at", lambda target: None)
    with pytest.raises(CommandError) as refused:
        await tree(queries, "a")
    assert refused.value.errno == errno.ENODEV
    assert parts.manager.registry.allocations() == set()
