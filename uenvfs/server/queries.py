"""The daemon's query socket: questions that do not go through FUSE, so that a client (the
SPANK plugin's `uenvfs attach`) can wait for an answer with a deadline, and never reads more
than its own answer. The protocol is core/queries.py; docs/interface.md has it all.

The server listens on `<state_dir>/socket` (mode 0666) in a task of its own. The keeper holds
the listening descriptor too (keeper/protocol.py, "hold-socket"), and hands it to every later
server: while no server runs (a crash, a restart), clients wait in its backlog, and the next
server answers them.

One request per connection, bounded: at most MAX_REQUEST bytes, sent whole within
REQUEST_SECONDS, else the connection is closed unanswered. The caller is known by SO_PEERCRED.
Each uid but root may have PER_UID connections served at once, the uids but root together
OTHERS, and all together CONNECTIONS (root always has CONNECTIONS - OTHERS for itself); a
connection past these is closed at once. Requests are answered by OPS, a table of small
functions, one per op; an answer may carry descriptors (SCM_RIGHTS). An op that counts a use
for the caller's allocation finds it from the caller's pid as FUSE requests are (a /proc read,
in a worker thread).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..core import control
from ..core.errors import CommandError, MountError
from ..core.labels import Ambiguous
from ..core.names import valid_alloc
from ..core.queries import MAX_REQUEST, REQUEST_SECONDS, SOCKET_MODE, line, parse_request, refusal
from ..fuse.allocation import AllocationResolver
from ..manager.images import Images
from .link import Link

log = logging.getLogger(__name__)

PER_UID = 16  # connections served at once for one uid but root
OTHERS = 256  # ... for all uids but root together
CONNECTIONS = 512  # ... for all together
ANSWER_SECONDS = 5.0  # to answer and send the answer, once the request is in
BACKLOG = socket.SOMAXCONN  # connections waiting to be accepted (while no server runs, too)
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Caller:
    """Who asks: the process at the other end of the connection (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Service:
    """What the ops answer from: the images, and whose each caller's process is."""

    images: Images
    resolver: AllocationResolver

    async def allocation_of(self, caller: Caller) -> str:
        """The allocation of *caller*'s process, as a FUSE request of it would count."""
        process = await trio.to_thread.run_sync(self.resolver.read, caller.pid, caller.uid)
        return self.resolver.judge(process)


@dataclass
class Reply:
    """An answer: its document, and the descriptors sent with it (closed once sent)."""

    document: dict[str, Any]
    fds: list[int] = field(default_factory=list)


Op = Callable[[Service, Caller, dict[str, Any]], Awaitable[Reply]]
OPS: dict[str, Op] = {}


def op(name: str) -> Callable[[Op], Op]:
    """Register the answer to the requests `{"op": name, ...}`."""
    def register(function: Op) -> Op:
        OPS[name] = function
        return function
    return register


@op("allocation")
async def allocation(service: Service, caller: Caller, request: dict[str, Any]) -> Reply:
    """The images that an allocation acquired (what a job's prolog acquires), with what
    `uenvfs attach` needs to bind them; the server, for its pid."""
    alloc = request.get("alloc")
    if not isinstance(alloc, str) or not valid_alloc(alloc):
        raise CommandError(errno.EINVAL, f"{alloc!r} is not an allocation id")
    images = service.images
    server = images.server.to_json() if images.server is not None else None
    return Reply({"ok": True, "alloc": alloc, "images": images.acquired_by(alloc),
                  "server": server})


@op("resolve")
async def resolve(service: Service, caller: Caller, request: dict[str, Any]) -> Reply:
    """The name under which the image that a word names is served: the word is read as in
    `.control` (a name, or a uenv label: partial, a sha256 or an id), so that `uenvfs run`
    resolves labels as the daemon does, whatever its configuration. Mounts nothing. A label
    that matches several images is refused (EINVAL) with every record it matches, as
    `candidates`."""
    word = request.get("image")
    if not isinstance(word, str):
        raise CommandError(errno.EINVAL, f"{word!r} is not an image name or uenv label")
    try:
        name = await service.images.image(control.NAME.read(word))
    except CommandError as exc:
        if not isinstance(exc.__cause__, Ambiguous):
            raise
        return Reply({**refusal(exc),
                      "candidates": [dataclasses.asdict(r) for r in exc.__cause__.records]})
    return Reply({"ok": True, "name": name})


@op("tree")
async def tree(service: Service, caller: Caller, request: dict[str, Any]) -> Reply:
    """Where the kernel mount of an image is (its backing mount, mounted first if need be),
    for `uenvfs run`, `start` and `attach` to bind in the caller's own mount namespace, with
    its device for them to check the bind. The image is named as in `.control` (a name or a
    uenv label). The handout counts as a use of the caller's allocation at once (it has not
    bound the tree yet)."""
    word = request.get("image")
    if not isinstance(word, str):
        raise CommandError(errno.EINVAL, f"{word!r} is not an image name or uenv label")
    images = service.images
    name = await images.image(control.NAME.read(word))
    alloc = await service.allocation_of(caller)
    try:
        mount = await images.ensure_mounted(name)
    except MountError as exc:
        raise CommandError(errno.EIO, str(exc)) from exc
    if not mount.device:  # not seen in the mount table when it was made: nothing to check
        raise CommandError(errno.ENODEV, f"the device of {name}'s backing mount is unknown")
    images.tree_handed(name, alloc)  # mounted still: no await since ensure_mounted
    device = f"{os.major(mount.device)}:{os.minor(mount.device)}"
    log.debug("tree of %s (%s) handed to pid %d of %s", name, device, caller.pid, alloc)
    return Reply({"ok": True, "name": name, "image_path": str(mount.image_path),
                  "backing": str(mount.backing), "device": device})


# -- the listening socket ----------------------------------------------------------------------


def handed_socket(text: str) -> int | None:
    """The listening descriptor the keeper handed over, from ENV_SOCKET's *text* (if any)."""
    if not text.isdigit():
        return None
    fd = int(text)
    os.set_inheritable(fd, False)
    return fd


def server(path: Path, handed: int | None, link: Link, service: Service) -> QueryServer | None:
    """The query socket's server, on the socket the keeper *handed* over or on a new one at
    *path*, which the keeper then holds too (see *link*). None: no socket could be made."""
    found = listener(path, handed)
    if found is None:
        return None
    sock, made = found
    link.hold_socket(sock.fileno(), made)
    return QueryServer(sock, service)


def listener(path: Path, handed: int | None) -> tuple[socket.socket, bool] | None:
    """The socket to listen on, and whether this server made it: the one the keeper *handed*
    over if it is one made for *path* (`_listens_at`), else a new one, which replaces what is
    at *path* at once (clients find the old one or the new one, never none). None if none can
    be made: the server then serves without (logged)."""
    if handed is not None:
        try:
            sock = socket.socket(fileno=handed)
        except OSError:
            os.close(handed)
        else:
            if _listens_at(sock, path):
                return sock, False
            sock.close()
        log.warning("the query socket the keeper held is not one at %s: making another", path)
    try:
        return _make(path), True
    except OSError as exc:
        log.error("no query socket at %s: %s (uenvfs attach, and so the SPANK plugin, cannot "
                  "ask this server)", path, exc.strerror or exc)
        return None


def _listens_at(sock: socket.socket, path: Path) -> bool:
    """Whether *sock* listens in *path*'s directory (bound to a temporary name there, then
    renamed to *path*: `_make`), and *path* is a socket."""
    try:
        return (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
                and Path(sock.getsockname()).parent == path.parent
                and stat.S_ISSOCK(os.lstat(path).st_mode))
    except OSError:
        return False


def _make(path: Path) -> socket.socket:
    """A socket listening at *path*: bound to a temporary name, renamed to *path* once it
    listens (getsockname() names the temporary one)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temporary))
        os.chmod(temporary, SOCKET_MODE)
        sock.listen(BACKLOG)
        os.replace(temporary, path)
    except OSError:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return sock


# -- serving -----------------------------------------------------------------------------------


class QueryServer:
    """Answers the connections to the query socket *sock*, each in a task of its own, from
    *service*.

    Invariants: `serving[uid]` is the number of connections of *uid* accepted and not yet
    closed (no entry at 0), at most PER_UID for a uid but root; `others` is their sum over the
    uids but root, at most OTHERS; `total` the sum over all, at most CONNECTIONS.
    """

    def __init__(self, sock: socket.socket, service: Service) -> None:
        self.sock = sock
        self.service = service
        self.metrics = service.images.metrics
        self.serving: dict[int, int] = {}
        self.others = 0
        self.total = 0
        self.refused = 0  # connections closed unanswered

    async def run(self) -> None:
        """Accept and answer connections until cancelled."""
        listening = trio.socket.from_stdlib_socket(self.sock)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = await listening.accept()
                except OSError as exc:
                    if exc.errno in (errno.ECONNABORTED, errno.EINTR):
                        continue
                    # Out of descriptors or memory: the connection waits in the backlog.
                    log.warning("query socket: cannot accept a connection: %s", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                caller = _caller(conn)
                if caller is None or not self._admit(caller):
                    self._refuse(caller, "over its share of connections")
                    conn.close()
                    continue
                nursery.start_soon(self._serve, conn, caller)

    def _admit(self, caller: Caller) -> bool:
        uid = caller.uid
        if self.total >= CONNECTIONS:
            return False
        if uid != 0:
            if self.serving.get(uid, 0) >= PER_UID or self.others >= OTHERS:
                return False
            self.others += 1
        self.serving[uid] = self.serving.get(uid, 0) + 1
        self.total += 1
        return True

    def _leave(self, caller: Caller) -> None:
        uid = caller.uid
        left = self.serving[uid] - 1
        if left:
            self.serving[uid] = left
        else:
            del self.serving[uid]
        self.total -= 1
        if uid != 0:
            self.others -= 1

    def _refuse(self, caller: Caller | None, why: str) -> None:
        self.refused += 1
        self.metrics.inc("uenvfs_query_refusals_total")
        if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th, 8th... time
            who = "an unknown caller" if caller is None else f"pid {caller.pid} uid {caller.uid}"
            log.warning("query socket: closed a connection of %s unanswered: %s (%d so far)",
                        who, why, self.refused)

    async def _serve(self, conn: trio.socket.SocketType, caller: Caller) -> None:
        reply: Reply | None = None
        try:
            with conn:
                data: bytes | None = b""
                with trio.move_on_after(REQUEST_SECONDS) as waited:
                    data = await _request_of(conn)
                if waited.cancelled_caught:
                    self._refuse(caller, f"no whole request within {REQUEST_SECONDS:g} s")
                    return
                if data is None:
                    self._refuse(caller, f"a request longer than {MAX_REQUEST} bytes")
                    return
                with trio.move_on_after(ANSWER_SECONDS):
                    reply = await self._answer(caller, data)
                    await _send(conn, reply)
        except OSError as exc:
            log.debug("query socket: pid %d: %s", caller.pid, exc)
        except Exception:
            # A bug answering one request must not stop the server: that caller gets no answer.
            log.exception("query socket: cannot answer pid %d", caller.pid)
        finally:
            self._leave(caller)
            for fd in reply.fds if reply is not None else ():
                os.close(fd)

    async def _answer(self, caller: Caller, data: bytes) -> Reply:
        name = "invalid"
        try:
            name, request = parse_request(data)
            answer = OPS.get(name)
            if answer is None:
                name = "invalid"
                raise CommandError(errno.EINVAL, f"no op {request['op']!r} (ops: "
                                   f"{', '.join(sorted(OPS))})")
            reply = await answer(self.service, caller, request)
            outcome = "ok"
        except CommandError as exc:
            reply = Reply(refusal(exc))
            outcome = errno.errorcode.get(exc.errno, str(exc.errno))
        self.metrics.inc("uenvfs_queries_total", op=name, outcome=outcome)
        log.debug("query from pid %d uid %d: %s: %s", caller.pid, caller.uid, name, outcome)
        return reply


def _caller(conn: trio.socket.SocketType) -> Caller | None:
    try:
        pid, uid, gid = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        PEERCRED.size))
    except OSError:
        return None
    return Caller(pid, uid, gid)


async def _request_of(conn: trio.socket.SocketType) -> bytes | None:
    """The request: the bytes up to the first newline, or to the end of the stream; None if it
    is longer than MAX_REQUEST (its newline included)."""
    data = bytearray()
    while True:
        chunk = await conn.recv(MAX_REQUEST)
        if not chunk:
            return bytes(data)
        end = chunk.find(b"\n")
        if end >= 0:
            if len(data) + end >= MAX_REQUEST:
                return None
            return bytes(data + chunk[:end])
        data += chunk
        if len(data) >= MAX_REQUEST:
            return None


async def _send(conn: trio.socket.SocketType, reply: Reply) -> None:
    data = memoryview(line(reply.document))
    if reply.fds:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", reply.fds))]
        data = data[await conn.sendmsg([data], rights):]
    while data:
        data = data[await conn.send(data):]
