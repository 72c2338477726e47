"""The query socket's protocol (core/queries.py) and its connection limits
(server/queries.py), without a socket."""

from __future__ import annotations

import errno
import json
import socket
from types import SimpleNamespace
from typing import Any, cast

import pytest

from uenvfs.core.errors import CommandError
from uenvfs.core.metrics import Metrics
from uenvfs.core.queries import parse_answer, parse_request, refusal, request
from uenvfs.fuse.allocation import AllocationResolver
from uenvfs.manager.images import Images
from uenvfs.server.queries import CONNECTIONS, OTHERS, PER_UID, Caller, QueryServer, Service


def test_a_request_is_one_json_object_with_an_op() -> None:
    line = request("allocation", alloc="slurm-42")
    assert line == b'{"op":"allocation","alloc":"slurm-42"}\n'
    assert parse_request(line) == ("allocation", {"op": "allocation", "alloc": "slurm-42"})
    for bad in (b"", b"not json", b"[1]", b'{"alloc": "x"}', b'{"op": 3}', b"\xff\xfe"):
        with pytest.raises(CommandError) as caught:
            parse_request(bad)
        assert caught.value.errno == errno.EINVAL


def test_answers() -> None:
    assert refusal(CommandError(errno.EINVAL, "no op 'x'")) == {
        "ok": False, "errno": "EINVAL", "error": "no op 'x'"}
    assert parse_answer(b'{"ok": true, "images": []}\n') == {"ok": True, "images": []}
    for bad in (b"[]", b'{"images": []}', b'{"ok": 1}'):
        with pytest.raises(ValueError, match='an answer is a JSON object with an "ok"'):
            parse_answer(bad)
    with pytest.raises(json.JSONDecodeError):
        parse_answer(b"{")


def _server() -> QueryServer:
    images = cast(Images, SimpleNamespace(metrics=Metrics()))
    return QueryServer(socket.socket(socket.AF_UNIX), Service(images, AllocationResolver()))


def test_connections_are_shared_out_by_uid() -> None:
    server = _server()
    try:
        users = [Caller(pid, 1000 + pid // PER_UID, 100) for pid in range(OTHERS)]
        nobody = Caller(1, 65534, 65534)
        for _ in range(PER_UID):
            assert server._admit(nobody)
        assert not server._admit(nobody)  # its share is used up; other users are not
        server._leave(nobody)
        assert server._admit(nobody)
        for _ in range(PER_UID):
            server._leave(nobody)
        admitted = [caller for caller in users if server._admit(caller)]
        assert admitted == users
        assert not server._admit(Caller(9, 5, 5))  # every user but root together: OTHERS
        root = Caller(2, 0, 0)
        rooted = 0
        while server._admit(root):  # root: no share of its own, and what the others left
            rooted += 1
        assert rooted == CONNECTIONS - OTHERS
        assert (server.total, server.others) == (CONNECTIONS, OTHERS)
        for caller in [*admitted, *[root] * rooted]:
            server._leave(caller)
        assert (server.total, server.others, server.serving) == (0, 0, {})
    finally:
        server.sock.close()


def test_refusals_are_counted() -> None:
    server = _server()
    try:
        server._refuse(None, "testing")
        server._refuse(Caller(1, 2, 3), "testing")
        metrics: Any = server.metrics
        assert metrics.counters["uenvfs_query_refusals_total"][()] == 2
    finally:
        server.sock.close()
