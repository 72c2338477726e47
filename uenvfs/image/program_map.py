"""The program map of the image sources: a program called with a name as its one argument,
which prints the image's path (exit 0) or nothing (any other exit: no such image). A name
that starts with '-' is no image, without asking the program: anyone can look a name up,
and the program must never be given an option.

Its answers are remembered (a "no" for `answer_ttl` seconds, a path until the next reload):
the kernel of this libfuse serializes lookups in one directory, so while the program runs, no
other new name in the root can be looked up. For the same reason a user other than root may
keep it busy only so long (`ProgramBudget`), its output is read up to one path, and it is
killed after its timeout.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

log = logging.getLogger(__name__)

MAX_ANSWERS = 10_000  # answers remembered; the "no"s are dropped beyond that
MAX_PROGRAM_OUTPUT = 4096 + 1  # one path (PATH_MAX bytes with its NUL) and a newline
# The kernel serializes lookups in the mount root, so while a program map runs no other new
# name can be looked up, by anyone. Each user but root may keep the program map busy for at
# most PROGRAM_SHARE of the time, after a burst of PROGRAM_BURST seconds; beyond that its
# unknown names are ENOENT without asking the program.
PROGRAM_SHARE = 0.1
PROGRAM_BURST = 2.0


@dataclass
class ProgramBudget:
    """Seconds of program-map time one user may still spend (a token bucket).

    Invariant: 0 <= seconds <= PROGRAM_BURST after `refill`; spending may take it below 0
    (a call's cost is known only once it is over), which delays the next call accordingly.
    """

    seconds: float = PROGRAM_BURST
    at: float = 0.0

    def refill(self, now: float) -> None:
        self.seconds = min(PROGRAM_BURST, self.seconds + (now - self.at) * PROGRAM_SHARE)
        self.at = now


@dataclass
class ProgramMap:
    """The program map *path* (None: none), its answers and each user's share of its time."""

    path: Path | None = None
    timeout: float = 10.0
    answer_ttl: float = 10.0
    _answers: dict[str, tuple[Path | None, float]] = field(default_factory=dict)
    _budgets: dict[int, ProgramBudget] = field(default_factory=dict)
    refused: int = 0  # calls refused for want of budget

    def configure(self, path: Path | None, timeout: float, answer_ttl: float) -> None:
        """Another program or answer lifetime forgets the answers (a reload)."""
        if (path, answer_ttl) != (self.path, self.answer_ttl):
            self._answers.clear()
        self.path, self.timeout, self.answer_ttl = path, timeout, answer_ttl

    def forget(self) -> None:
        """Forget every answer (the sources were read again)."""
        self._answers.clear()

    def remembers(self, name: str) -> bool:
        """Whether the program named an image for *name* (and no reload forgot it)."""
        answer = self._answers.get(name)
        return answer is not None and answer[0] is not None

    async def resolve(self, name: str, uid: int,
                      is_image: Callable[[Path], Awaitable[bool]]) -> Path | None:
        """The image path the program gives for *name* (asked by *uid*), remembered; None if
        it gives none, or *uid* used its share. *is_image* checks the path it prints."""
        if name.startswith("-"):
            log.debug("program map: %r looks like an option; not asked", name)
            return None
        known = self._answers.get(name)
        now = trio.current_time()
        if known is not None and (known[0] is not None or now < known[1]):
            return known[0]
        budget = None
        if uid != 0:
            budget = self._budgets.get(uid)
            if budget is None:
                budget = self._budgets[uid] = ProgramBudget(at=now)
            budget.refill(now)
            if budget.seconds <= 0:
                self.refused += 1
                log.debug("program map: uid %d is over its share; %r not asked", uid, name)
                return None
            if len(self._budgets) > MAX_ANSWERS:
                self._budgets = {u: b for u, b in self._budgets.items() if b.seconds < 0}
        path = await self._ask(name, is_image)
        done = trio.current_time()
        if budget is not None:
            budget.seconds -= done - now
        self._answers[name] = (path, done + self.answer_ttl)
        if len(self._answers) > MAX_ANSWERS:
            self._answers = {n: a for n, a in self._answers.items() if a[0] is not None}
        return path

    async def _ask(self, name: str, is_image: Callable[[Path], Awaitable[bool]]) -> Path | None:
        assert self.path is not None
        try:
            with trio.fail_after(self.timeout):
                returncode, out = await _run_bounded([str(self.path), name],
                                                     MAX_PROGRAM_OUTPUT)
        except trio.TooSlowError:
            log.warning("program map %s %s: no answer after %.1f s",
                        self.path, name, self.timeout)
            return None
        except OSError as exc:
            log.warning("program map %s cannot run: %s", self.path, exc)
            return None
        if returncode is None:
            log.warning("program map %s %s: more than %d bytes of output; killed",
                        self.path, name, MAX_PROGRAM_OUTPUT)
            return None
        if returncode != 0:
            log.debug("program map %s %s: exit %d", self.path, name, returncode)
            return None
        lines = out.decode("utf-8", "replace").split()
        if len(lines) != 1 or not lines[0].startswith("/"):
            log.warning("program map %s %s: expected one absolute path, got %r",
                        self.path, name, out[:200])
            return None
        path = Path(lines[0])
        return path if await is_image(path) else None


async def _run_bounded(command: list[str], limit: int) -> tuple[int | None, bytes]:
    """Run *command* and read at most *limit* bytes of its output.

    Returns its exit status and output, or None and what was read if it printed more (it is
    killed then: an answer is one path, and a runaway program must not fill the daemon's
    memory). Killed too when cancelled (e.g. by a time limit).
    """
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    out = bytearray()
    try:
        async with process.stdout:
            while len(out) <= limit:
                chunk = await process.stdout.receive_some(limit + 1 - len(out))
                if not chunk:
                    break
                out += chunk
        if len(out) > limit:
            return None, bytes(out[:limit])
        return await process.wait(), bytes(out)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
