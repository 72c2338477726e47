"""The query socket's protocol: what a client asks the daemon without going through FUSE, and
what the daemon answers. Pure (no trio, no pyfuse3): the daemon's side is server/queries.py, a
client's client/ask.py; docs/interface.md ("The query socket") is the reference.

The daemon listens on a unix stream socket, `<state_dir>/socket` (mode 0666); the mount root's
`.socket` is a symlink to it, so a client that knows only the mountpoint finds it. One request
per connection: the client sends one JSON object on one line, the daemon answers with one JSON
object on one line (with descriptors, SCM_RIGHTS, where the answer has any) and closes.

    {"op": "allocation", "alloc": "slurm-42"}
    {"ok": true, "alloc": "slurm-42",
     "images": [{"name": "pytorch-2.5", "image_path": "/images/pytorch-2.5.sqfs",
                 "state": "mounted", "error": null}],
     "server": {"pid": 812, "version": "0.1.0", "started": ..., "resumes": 0, ...}}
    {"ok": false, "errno": "EINVAL", "error": "'a b' is not an allocation id"}

    {"op": "tree", "image": "pytorch-2.5"}
    {"ok": true, "name": "pytorch-2.5", "image_path": "/images/pytorch-2.5.sqfs",
     "backing": "/run/pact/uenvfs/mnt/pytorch-2.5", "device": "7:3"}

    {"op": "resolve", "image": "prgenv-gnu/24.11:v1"}
    {"ok": true, "name": "0123456789abcdef"}
    {"ok": false, "errno": "EINVAL", "error": "prgenv-gnu is ambiguous: ...",
     "candidates": [{"system": "daint", "uarch": "gh200", "name": "prgenv-gnu", ...}]}

(`resolve`: the served name of what a word names, as `.control` reads it, for `uenvfs run`
and the CLI to resolve labels as the daemon does; `candidates`: the records of an ambiguous
label. `tree`: where the image's kernel mount is, mounted for it, for `uenvfs run`, `start` and
`attach` to bind in the caller's own mount namespace and check by its device.)

A request longer than MAX_REQUEST bytes, or not sent whole within REQUEST_SECONDS, gets no
answer: the connection is closed. A client reads at most MAX_ANSWER bytes of an answer.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from typing import Any

from .errors import CommandError

SOCKET_MODE = 0o666  # every user may ask
MAX_REQUEST = 64 * 1024  # bytes of one request, its newline included
REQUEST_SECONDS = 5.0  # a request must arrive whole within this, from the connection's accept
MAX_ANSWER = 16 << 20  # bytes of one answer a client reads at most (more: no answer)


def line(document: Mapping[str, Any]) -> bytes:
    """*document* as one line of the protocol."""
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


def request(op: str, **fields: Any) -> bytes:
    """The line of a request: `{"op": OP, ...fields}`."""
    return line({"op": op, **fields})


def parse_request(data: bytes) -> tuple[str, dict[str, Any]]:
    """The op of the request *data* (one line, its newline stripped or not) and the whole
    request. `CommandError` (EINVAL) if it is not a JSON object with a string "op"."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CommandError(errno.EINVAL, f"a request is one JSON object on one line: {exc}"
                           ) from None
    if not isinstance(document, dict) or not isinstance(document.get("op"), str):
        raise CommandError(errno.EINVAL, 'a request is a JSON object with an "op" string')
    return document["op"], document


def refusal(exc: CommandError) -> dict[str, Any]:
    """The answer to a refused request: `{"ok": false, "errno": NAME, "error": TEXT}`."""
    return {"ok": False, "errno": errno.errorcode.get(exc.errno, str(exc.errno)),
            "error": str(exc)}


def parse_answer(data: bytes) -> dict[str, Any]:
    """The answer *data* (one line); ValueError if it is not an answer of this protocol."""
    document = json.loads(data.decode("utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("ok"), bool):
        raise ValueError('an answer is a JSON object with an "ok" boolean')
    return document
