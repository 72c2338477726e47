"""Asking the daemon's query socket (core/queries.py) within a deadline, for `uenvfs attach`
(which the SPANK plugin runs for the tasks of jobs that acquired images), `run` and `start`.
Nothing goes through FUSE but reading the mount root's `.socket` link, when the socket is not
named, and that is waited for no longer than the deadline either (`socket_at` waits as long as
the server takes). Never imports trio or pyfuse3.

A connection closed without an answer (a server killed while it answered, a server over its
share of connections) is tried again until the deadline: a query only reads.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..core.labels import Record, table
from ..core.queries import MAX_ANSWER, parse_answer, request
from .exits import RunError

AGAIN = 0.05  # seconds between tries


class _NoAnswer(Exception):
    """The connection ended, or could not be made for now, without an answer: try again."""


def ask(mountpoint: Path, request: bytes, socket_path: Path | None, timeout: float,
        since: float | None = None) -> dict[str, Any]:
    """The answer of the uenvfs at *mountpoint* to *request* (one line), through the socket
    at *socket_path* (None: where `.socket` leads). `RunError` if none comes within
    *timeout* seconds (from *since*, a time.monotonic() of the first of several questions
    that share them; else from now), or if no uenvfs serves there."""
    deadline = (time.monotonic() if since is None else since) + timeout
    late = RunError(f"uenvfs at {mountpoint} did not answer within {timeout:g} s")
    path = socket_path or _linked(mountpoint, deadline, late)
    while True:
        try:
            return _exchange(mountpoint, path, request, deadline)
        except TimeoutError:
            raise late from None
        except _NoAnswer:
            if time.monotonic() + AGAIN >= deadline:
                raise late from None
            time.sleep(AGAIN)


def _linked(mountpoint: Path, deadline: float, late: RunError) -> Path:
    """Where `<mountpoint>/.socket` leads, read in a thread of its own: a server that does
    not answer holds up that thread, never this one beyond *deadline*."""
    found: list[str | OSError] = []

    def read() -> None:
        try:
            found.append(os.readlink(mountpoint / ".socket"))
        except OSError as exc:
            found.append(exc)

    reader = threading.Thread(target=read, name="readlink", daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    if not found:
        raise late
    target = found[0]
    if isinstance(target, OSError):
        raise _no_link(mountpoint, target)
    return mountpoint / target  # an absolute target stays as it is


def socket_at(mountpoint: Path) -> Path:
    """Where `<mountpoint>/.socket` leads, read in this thread, however long the server takes
    to answer: for callers that read through the mount anyway, and may start no thread (`run`
    makes a user namespace, which the kernel refuses a process with several threads)."""
    try:
        return mountpoint / os.readlink(mountpoint / ".socket")
    except OSError as exc:
        raise _no_link(mountpoint, exc) from None


def _no_link(mountpoint: Path, exc: OSError) -> RunError:
    return RunError(f"no uenvfs serving at {mountpoint} (is the uenvfs service running?): "
                    f"{mountpoint / '.socket'}: {exc.strerror}")


def _exchange(mountpoint: Path, path: Path, request: bytes, deadline: float) -> dict[str, Any]:
    """One connection: send *request*, read the answer's line. TimeoutError past *deadline*;
    _NoAnswer if the connection ends without an answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_left(deadline))
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise RunError(f"no uenvfs serving at {mountpoint} (is the uenvfs service "
                           f"running?): {path}: {exc.strerror}") from None
        except BlockingIOError:  # its backlog is full: a server is on its way
            raise _NoAnswer from None
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(request)
            data = bytearray()
            while not data.endswith(b"\n"):
                if len(data) > MAX_ANSWER:
                    raise RunError(f"uenvfs at {mountpoint} answered more than {MAX_ANSWER} "
                                   "bytes")
                sock.settimeout(_left(deadline))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise _NoAnswer
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            raise _NoAnswer from None
        except OSError as exc:
            if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
                raise TimeoutError from None
            raise RunError(f"uenvfs at {mountpoint}: {path}: {exc.strerror}") from None
    try:
        return parse_answer(bytes(data))
    except ValueError as exc:
        raise RunError(f"uenvfs at {mountpoint} answered what is not an answer: {exc}"
                       ) from None


def _left(deadline: float) -> float:
    """Seconds left until *deadline*; TimeoutError if none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def resolve(mountpoint: Path, word: str, socket_path: Path | None, timeout: float
            ) -> dict[str, Any]:
    """The daemon's answer to `resolve` *word* (core/queries.py): `{"ok": true, "name": ...}`
    or its refusal (`RunError` as `ask`)."""
    return ask(mountpoint, request("resolve", image=word), socket_path, timeout)


def ambiguity(word: str, answer: dict[str, Any]) -> str | None:
    """The candidates of an ambiguous label that a refusal of `resolve` lists, as uenv
    lists them (a table of their records); None if it lists none."""
    listed = answer.get("candidates")
    if answer.get("ok") or not isinstance(listed, list) or not listed:
        return None
    try:
        records = [Record(**entry) for entry in listed]
    except TypeError:
        return None
    images = len({record.sha256 for record in records})
    return (f"{word} is ambiguous: it matches {images} images; say which with a longer "
            "label or an id:\n" + "\n".join("  " + line for line in table(records)))
