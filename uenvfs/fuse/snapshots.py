"""The content of `.status` and `.metrics`, made once and shared by every handle that may see
it, at a bounded cost.

An open of `.status` or `.metrics` gets the file's content as of that open, and keeps it: its
reads are consistent (the files are read with direct_io, size 0). Made at each open, a reader
in a loop would make the daemon render a document again and again in the event loop (a
`.status` of 550 KB took 33 ms each, and every other job's requests waited), and each handle
held would keep a copy of its own. So a `Renderer` keeps the last content (a `Snapshot`) and
hands that very bytes object to every open that may see it:

  - `.status` shows the images' states: the same snapshot serves every open until what it
    shows changes (`ImageService.status_version`), or, while it shows hold times that run,
    until it is `MAX_AGE` old (the processes sitting in images are counted by a scan at most
    that old anyway, see fuse/uses.py);
  - an open that needs a newer one waits for the next render, which starts after that open
    (so it shows everything done before it) and serves every open that waits meanwhile;
  - renders are at least `MIN_GAP` apart, and take at most `DUTY` of the time (after a render
    that took t seconds the next waits t * (1 / DUTY - 1)): however many read in a loop, the
    daemon renders a few times a second at most, and the readers wait, not the other jobs;
  - `.status` is encoded in a worker thread (its document is built in the loop, from the
    state as of then), so the loop goes on answering while a big one is encoded.

`.metrics` counts every request, so its content changes all the time: each open waits for a
render that starts after it, shared with the opens waiting meanwhile, under the same bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

MIN_GAP = 0.05  # seconds from one render of a file to the next, at least
DUTY = 0.1  # the share of the time that renders of one file may take, at most
MAX_AGE = 0.5  # seconds a snapshot showing hold times that run is served, at most


@dataclass(frozen=True, eq=False, slots=True)
class Snapshot:
    """A file's content (`data`, shared by every handle given it), and what it was made of:
    `version` of the state then, `made` (trio's clock) when its document was built, and
    whether it `ages` (shows times that run, so it goes stale by itself)."""

    data: bytes
    version: object
    made: float
    ages: bool


@dataclass(eq=False)
class _Render:
    """One render, awaited by the opens that wait for it (None: it failed or was cancelled,
    they try again)."""

    done: trio.Event = field(default_factory=trio.Event)
    snapshot: Snapshot | None = None


class Renderer:
    """Makes the content of one file: `build` the document (in the loop), `encode` it (in a
    worker thread if `off_loop`: the document must then be the render's own), `ages` says
    whether it shows times that run. `version` says what the document shows (compared with
    ==; None: it changes all the time).

    Invariants: `last` is the latest snapshot made; at most one render runs at a time, and one
    starts at least max(MIN_GAP, (1 / DUTY - 1) * the last one's time) after the last one
    ended; `pending` is the render that the opens waiting now will get, not begun yet (it
    builds its document after every one of them came).
    """

    def __init__(self, build: Callable[[], Any], encode: Callable[[Any], bytes], *,
                 version: Callable[[], object] | None = None,
                 ages: Callable[[Any], bool] = lambda document: False,
                 off_loop: bool = False) -> None:
        self.build = build
        self.encode = encode
        self.version = version
        self.ages = ages
        self.off_loop = off_loop
        self.last: Snapshot | None = None
        self.pending: _Render | None = None
        self.renders = 0  # made so far, for `.metrics`
        self._lock = trio.Lock()
        self._next_at = -math.inf  # (trio's clock) no render starts before this

    def current(self) -> bytes | None:
        """The last snapshot's data if an open now may get it; else None."""
        last = self.last
        if last is None or self.version is None or last.version != self.version():
            return None
        if last.ages and trio.current_time() - last.made >= MAX_AGE:
            return None
        return last.data

    async def get(self) -> bytes:
        """The content for an open now: the current snapshot, or the next render's."""
        while True:
            data = self.current()
            if data is not None:
                return data
            render = self.pending
            if render is None:
                render = self.pending = _Render()
                await self._make(render)
            else:
                await render.done.wait()
            if render.snapshot is not None:
                return render.snapshot.data

    def now(self) -> bytes:
        """The content for an open now, made at once in the loop if needed (a server that
        restores the handles of the last one, before it serves)."""
        data = self.current()
        if data is None:
            data = self._render(trio.current_time()).data
        return data

    async def _make(self, render: _Render) -> None:
        try:
            async with self._lock:
                wait = self._next_at - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                # From here on, an open needs a later render: this one's document is built
                # now, without a checkpoint in between.
                if self.pending is render:
                    self.pending = None
                started = trio.current_time()
                if self.off_loop:
                    version = self.version() if self.version is not None else None
                    document = self.build()
                    data = await trio.to_thread.run_sync(self.encode, document)
                    render.snapshot = self._keep(data, version, started, self.ages(document))
                else:
                    render.snapshot = self._render(started)
        finally:
            if self.pending is render:
                self.pending = None
            render.done.set()

    def _render(self, started: float) -> Snapshot:
        version = self.version() if self.version is not None else None
        document = self.build()
        return self._keep(self.encode(document), version, started, self.ages(document))

    def _keep(self, data: bytes, version: object, started: float, ages: bool) -> Snapshot:
        ended = trio.current_time()
        self._next_at = ended + max(MIN_GAP, (ended - started) * (1 / DUTY - 1))
        self.renders += 1
        snapshot = self.last = Snapshot(data, version, started, ages)
        return snapshot

