"""The pure refcount and lifecycle machine of every image (invariants WI2 and WI3 of
docs/interface.md: refcount == allocations using the image, never negative; lazy unmount
after the hold time).

No trio, no pyfuse3, no clock: every event takes the time as an argument, so the rules are
tested in microseconds without a mount. The manager drives it and does the I/O.

Lifecycle of one image::

    UNMOUNTED ─begin_mount─► MOUNTING ─mounted─► HOLDING ◄─last release─ MOUNTED
        ▲                       │               (refcount 0, ─first use─►  (refcount > 0)
        │                       │                timer runs)
        │                       └─mount_failed─► FAILED        │ expire (timer or command)
        │                                                      ▼
        └──────────────────────── unmounted ◄──────────── UNMOUNTING

`force_unmount` takes MOUNTED or HOLDING straight to UNMOUNTING and drops every user; the image
is then FAILED ("force-unmounted") until it is next used.

Uses that FUSE does not see are set by scans of the processes (`scanned`): processes sitting in
the image (`cwd`), and mount namespaces holding a mount of it (`namespaces`). A tree of the
image handed out to be attached in a namespace (`handed`) counts as one such namespace at once,
and for `GRACE` seconds whatever a scan says: the image cannot expire between the handout and
the attach that a scan would see.

`held_before` and `failed_before` carry on what the server before this one handed over at a
planned restart: a running hold timer, a failure still in its negative-cache time.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import RefcountInconsistency

log = logging.getLogger(__name__)

FORCE_UNMOUNTED = "force-unmounted"
GRACE = 10.0  # seconds a tree handed out counts as a namespace, whatever a scan finds


class Phase(enum.Enum):
    """Where an image is in its lifecycle. The value is what `.status` shows."""

    UNMOUNTED = "unmounted"
    MOUNTING = "mounting"
    MOUNTED = "mounted"
    HOLDING = "holding"
    UNMOUNTING = "unmounting"
    FAILED = "failed"


class IllegalTransition(RuntimeError):
    """An event that the current phase does not allow: a bug in the caller."""


@dataclass(frozen=True, slots=True)
class Scanned:
    """What a scan of the processes found of one allocation in one image."""

    cwd: int = 0  # its processes whose working directory or root is in the image
    namespaces: int = 0  # mount namespaces of its processes holding a mount of the image


NOTHING = Scanned()


@dataclass(eq=False)
class Use:
    """One allocation's use of one image.

    Its identity matters: a file handle keeps the `Use` it was counted in, and its release
    only counts while that very object is still the allocation's use of the image. After
    `release` or `reconcile` forgot the allocation, a late close is then a no-op instead of
    a second decrement.
    """

    alloc: str
    opens: int = 0
    acquired: bool = False
    cwd: int = 0  # its processes whose working directory or root is in the image (a scan's)
    namespaces: int = 0  # mount namespaces of its processes holding the image (a scan's)
    handed_until: float = -math.inf  # a tree handed out counts as a namespace until then

    @property
    def active(self) -> bool:
        return self.opens > 0 or self.acquired or self.cwd > 0 or self.namespaces > 0


class Changes:
    """Counts the events that may change what `.status` shows, of every image of a registry
    (one shared by them): `.status` is made again only after one (see fuse/snapshots.py)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class Image:
    """The state of one image.

    Invariants (checked by `check`):
      - refcount == len(users) >= 0, and every user is active (opens > 0, acquired,
        processes sitting in the image: cwd > 0, or namespaces holding it: namespaces > 0);
      - users is non-empty only while MOUNTED, and MOUNTED always has users;
      - idle_since is set (the hold timer runs) exactly while HOLDING.
    """

    def __init__(self, name: str, changes: Changes | None = None) -> None:
        self.name = name
        self.changes = changes if changes is not None else Changes()
        self.phase = Phase.UNMOUNTED
        self.users: dict[str, Use] = {}
        self.idle_since: float | None = None
        self.error: str | None = None
        self.retry_at = 0.0
        self._forced = False

    # -- queries -------------------------------------------------------------------------

    @property
    def refcount(self) -> int:
        return len(self.users)

    @property
    def is_mounted(self) -> bool:
        """Whether the backing mount exists and may serve requests."""
        return self.phase in (Phase.MOUNTED, Phase.HOLDING)

    def check(self) -> None:
        """Raise `RefcountInconsistency` if an invariant does not hold."""
        if any(not u.active or min(u.opens, u.cwd, u.namespaces) < 0
               for u in self.users.values()):
            raise RefcountInconsistency(f"{self.name}: inactive or negative use {self.users}")
        if (self.phase is Phase.MOUNTED) != bool(self.users):
            raise RefcountInconsistency(
                f"{self.name}: phase {self.phase.value} with refcount {self.refcount}"
            )
        if (self.phase is Phase.HOLDING) != (self.idle_since is not None):
            raise RefcountInconsistency(f"{self.name}: hold timer wrong in {self.phase.value}")

    # -- events --------------------------------------------------------------------------

    def _require(self, event: str, *phases: Phase) -> None:
        if self.phase not in phases:
            raise IllegalTransition(f"{self.name}: {event} while {self.phase.value}")
        self.changes.count += 1  # an event: what `.status` shows may change

    def may_mount(self, now: float) -> bool:
        """Whether `begin_mount` is allowed now (a failure is retried after its negative cache)."""
        if self.phase is Phase.UNMOUNTED:
            return True
        return self.phase is Phase.FAILED and now >= self.retry_at

    def begin_mount(self, now: float) -> None:
        self.changes.count += 1
        if not self.may_mount(now):
            raise IllegalTransition(f"{self.name}: begin_mount while {self.phase.value}")
        self.phase = Phase.MOUNTING
        self.error = None
        self._forced = False

    def mounted(self, now: float) -> None:
        """The backing mount is there; nobody uses it yet, so the hold timer starts."""
        self._require("mounted", Phase.MOUNTING)
        self.phase = Phase.HOLDING
        self.idle_since = now

    def mount_failed(self, now: float, error: str, retry_after: float) -> None:
        self._require("mount_failed", Phase.MOUNTING)
        self.phase = Phase.FAILED
        self.error = error
        self.retry_at = now + retry_after

    def _add_use(self, alloc: str) -> Use:
        self._require("use", Phase.MOUNTED, Phase.HOLDING)
        use = self.users.get(alloc)
        if use is None:
            use = self.users[alloc] = Use(alloc)
            if len(self.users) == 1:
                log.debug("%s: refcount 0 -> 1 (%s), hold timer stopped", self.name, alloc)
        self.phase = Phase.MOUNTED
        self.idle_since = None
        return use

    def _drop_if_idle(self, use: Use, now: float) -> None:
        self.changes.count += 1  # a count changed
        if not use.active:
            del self.users[use.alloc]
            if not self.users:
                self.phase = Phase.HOLDING
                self.idle_since = now
                log.debug("%s: refcount 1 -> 0 (%s left), hold timer started", self.name,
                          use.alloc)

    def open(self, alloc: str, now: float) -> Use:
        """A file or directory handle of *alloc* opened. Returns the use to close later."""
        use = self._add_use(alloc)
        use.opens += 1
        return use

    def close(self, use: Use, now: float) -> bool:
        """A handle counted in *use* was released. False if that use was forgotten already."""
        if self.users.get(use.alloc) is not use:
            return False
        if use.opens <= 0:
            raise RefcountInconsistency(
                f"{self.name}: close by {use.alloc} with {use.opens} opens would go negative"
            )
        use.opens -= 1
        self._drop_if_idle(use, now)
        return True

    def transfer(self, use: Use, alloc: str, now: float) -> Use | None:
        """Count one open of *use* for *alloc* instead; None if *use* was forgotten already.

        For an executable: its allocation is only known once its execve is over.
        """
        if self.users.get(use.alloc) is not use or use.alloc == alloc:
            return None
        new = self._add_use(alloc)
        new.opens += 1
        self.close(use, now)
        return new

    def acquire(self, alloc: str, now: float) -> bool:
        """*alloc* uses the image until released. False if it had acquired it already."""
        use = self._add_use(alloc)
        already = use.acquired
        use.acquired = True
        return not already

    def handed(self, alloc: str, now: float, grace: float = GRACE) -> Use:
        """A tree of the image was handed to a process of *alloc*, to attach in its mount
        namespace: one namespace use at once, which scans keep for *grace* seconds at least."""
        use = self._add_use(alloc)
        use.namespaces = max(use.namespaces, 1)
        use.handed_until = max(use.handed_until, now + grace)
        return use

    def scanned(self, found: Mapping[str, Scanned], now: float) -> bool:
        """A scan of the processes found this of each allocation (nothing, of those not
        named); a tree handed out less than its grace ago counts as one namespace still.
        Only a mounted image counts them. Returns whether a count changed."""
        if not self.is_mounted:
            return False
        changed: list[Use] = []
        for alloc in sorted(self.users.keys() | found.keys()):
            use = self.users.get(alloc)
            seen = found.get(alloc, NOTHING)
            cwd, namespaces = seen.cwd, seen.namespaces
            if use is not None and now < use.handed_until:
                namespaces = max(namespaces, 1)
            if use is None:
                if not (cwd > 0 or namespaces > 0):
                    continue
                use = self._add_use(alloc)
            elif (use.cwd, use.namespaces) == (cwd, namespaces):
                continue
            use.cwd, use.namespaces = cwd, namespaces
            changed.append(use)
        for use in changed:  # after every count is set: no timer starts and stops at once
            self._drop_if_idle(use, now)
        return bool(changed)

    def release(self, alloc: str, now: float) -> bool:
        """*alloc* no longer uses the image; its open handles are forgotten too, and its
        processes sitting in it and namespaces holding it (a tree handed out too) until a
        scan finds them again."""
        use = self.users.get(alloc)
        if use is None:
            return False
        use.opens = 0
        use.acquired = False
        use.cwd = 0
        use.namespaces = 0
        use.handed_until = -math.inf
        self._drop_if_idle(use, now)
        return True

    def due(self, now: float, hold_time: float) -> bool:
        return self.idle_since is not None and now >= self.idle_since + hold_time

    def expire(self, now: float, hold_time: float, *, force: bool = False) -> bool:
        """Start unmounting if idle and the hold time is over (or *force*). True if it did."""
        if self.phase is not Phase.HOLDING or not (force or self.due(now, hold_time)):
            return False
        self.changes.count += 1
        self.phase = Phase.UNMOUNTING
        self.idle_since = None
        return True

    def force_unmount(self, now: float) -> list[str]:
        """Emergency: unmount whatever the refcount. Returns the allocations dropped."""
        self._require("force_unmount", Phase.MOUNTED, Phase.HOLDING)
        dropped = list(self.users)
        self.users.clear()
        self.phase = Phase.UNMOUNTING
        self.idle_since = None
        self._forced = True
        return dropped

    def unmounted(self, now: float) -> None:
        self._require("unmounted", Phase.UNMOUNTING)
        if self._forced:
            self.phase = Phase.FAILED
            self.error = FORCE_UNMOUNTED
            self.retry_at = now
        else:
            self.phase = Phase.UNMOUNTED
            self.error = None

    def held_before(self, now: float, idle_for: float) -> None:
        """The server before this one had held the image idle for *idle_for* seconds (a
        planned restart): its hold timer runs on from there, not from now."""
        self._require("held_before", Phase.HOLDING)
        self.idle_since = now - idle_for

    def failed_before(self, now: float, error: str, retry_in: float) -> None:
        """The server before this one failed to mount the image: it stays failed for the
        rest of that negative-cache time (a planned restart)."""
        self._require("failed_before", Phase.UNMOUNTED)
        self.phase = Phase.FAILED
        self.error = error
        self.retry_at = now + retry_in

    def unmount_failed(self, now: float, error: str) -> None:
        """The backing mount is still there: hold it again, the timer retries later."""
        self._require("unmount_failed", Phase.UNMOUNTING)
        self.phase = Phase.HOLDING
        self.idle_since = now
        self.error = error
        self._forced = False
