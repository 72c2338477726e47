"""The mount manager: drives the pure state machine with real mounts, timers and commands.

One trio task per mount or unmount (`mount:<name>`, `unmount:<name>`) and one hold timer task
(`hold-timer`). Callers never run a mount tool themselves: they start the task if needed and
wait for the image's change event, so concurrent first accesses produce exactly one mount and a
cancelled caller never leaves a half-made mount behind.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from . import control, journal, squashfs
from .backend import MountBackend, is_mount_point
from .catalog import Catalog
from .config import Config
from .control import Command, MountStatus
from .errors import CommandError, MountError, MountFailed, RefcountInconsistency, UnmountFailed
from .journal import Journal, MountRecord
from .metrics import Metrics
from .recovery import Adoption
from .state import Phase, Registry, Use

log = logging.getLogger(__name__)

Identity = tuple[int, int, int, int]
JOURNAL_DELAY = 0.05  # seconds a mount or unmount waits to be journaled (an acquisition: none)


@dataclass(eq=False)
class Tree:
    """One version of one image file. Inode numbers inside it derive from its slot.

    When the file behind a name changes (new identity), the next mount gets a new tree, so
    no inode number of the old content is ever reused for the new one.
    """

    slot: int
    identity: Identity
    validated: bool = False  # checked once per version: a remount of the same file is not


@dataclass(eq=False)
class Mount:
    """A live backing mount."""

    name: str
    image_path: Path
    backing: Path
    tree: Tree
    source: str
    mounted_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.root = os.fsencode(self.backing)  # the backing directory, for path building


def identity_of(path: Path) -> Identity:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def iso_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class Manager:
    """Every image's backing mount, refcounts and hold timer; executes `.control` commands."""

    def __init__(
        self,
        config: Config,
        backend: MountBackend,
        catalog: Catalog,
        clock: Callable[[], float] = trio.current_time,
        *,
        journal_in_thread: bool = True,
    ) -> None:
        self.config = config
        self.backend = backend
        self.catalog = catalog
        self.clock = clock
        self.registry = Registry(config.hold_time)
        self.metrics = Metrics()
        self.mounts: dict[str, Mount] = {}
        self.emergency = False
        self.paths: dict[str, Path] = {}  # last known image path of each name
        self._trees: dict[str, Tree] = {}
        self._next_slot = 1
        self._changed: dict[str, trio.Event] = {}
        self._wakeup = trio.Event()
        self._sleeping_until = math.inf  # the deadline the hold timer waits for
        self._journal_wanted = self._journal_done = 0  # generations of the journal
        self._journal_wake = trio.Event()
        self._journal_written = trio.Event()
        self._journal_urgent = False
        # The fsync goes to a worker thread; tests in virtual time write in the loop instead
        # (trio's autojump clock would jump while the thread works).
        self._journal_in_thread = journal_in_thread
        self._nursery: trio.Nursery | None = None
        # Hooks for the filesystem layer: an image's handles must die / its caches go stale.
        self.on_force_unmount: Callable[[str], Awaitable[None]] = _nothing
        self.on_stale_entry: Callable[[str], None] = lambda name: None
        self.on_listing_changed: Callable[[Iterable[str]], None] = lambda names: None

    # -- tasks ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the hold timer and host the mount and unmount tasks until cancelled."""
        if self.clock is trio.current_time:
            # The same clock without trio's lookups on every call (every open and close).
            self.clock = trio.lowlevel.current_clock().current_time
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._hold_timer, name="hold-timer")
            nursery.start_soon(self._journal_writer, name="journal")
            task_status.started()

    async def _hold_timer(self) -> None:
        while True:
            self._wakeup = trio.Event()
            deadline = self.registry.next_deadline()
            self._sleeping_until = math.inf if deadline is None else deadline
            with trio.move_on_at(self._sleeping_until):
                await self._wakeup.wait()
            now = self.clock()
            for image in self.registry.due(now):
                if image.expire(now, self.registry.hold_time_of(image)):
                    log.info("%s: hold time %.3g s over, unmounting", image.name,
                             self.registry.hold_time_of(image))
                    self._start_unmount(image.name)

    def _wake(self) -> None:
        """Deadlines may have changed: let the hold timer look again."""
        self._wakeup.set()

    def _wake_for(self, name: str) -> None:
        """*name* may have started its hold timer: wake the timer if it must run out sooner.

        (A timer stopped by a new use needs no wake-up: at its deadline nothing is due.)
        """
        deadline = self.registry.deadline(self.registry[name])
        if deadline is not None and deadline < self._sleeping_until:
            self._wakeup.set()

    def _event(self, name: str) -> trio.Event:
        event = self._changed.get(name)
        if event is None:
            event = self._changed[name] = trio.Event()
        return event

    def _notify(self, name: str) -> None:
        self._changed.pop(name, trio.Event()).set()
        self._wake()

    def _spawn(self, fn: Callable[[str], Awaitable[object]], name: str, task: str) -> None:
        self.spawn(fn, name, task=f"{task}:{name}")

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object, task: str) -> None:
        """Run *fn* as a task of the manager (it outlives the request that started it)."""
        assert self._nursery is not None, "Manager.run() is not running"
        self._nursery.start_soon(fn, *args, name=task)

    # -- mounting ------------------------------------------------------------------------

    def mounted(self, name: str) -> Mount | None:
        """The backing mount of *name* if it is mounted now (no mounting)."""
        image = self.registry.images.get(name)
        return self.mounts.get(name) if image is not None and image.is_mounted else None

    async def ensure_mounted(self, name: str) -> Mount:
        """The backing mount of *name*, mounting it first if needed.

        Raises `MountFailed` (EIO) if the mount fails or failed less than the negative cache
        time ago.
        """
        while True:
            image = self.registry[name]
            if image.is_mounted:
                return self.mounts[name]
            if image.phase in (Phase.MOUNTING, Phase.UNMOUNTING):
                await self._event(name).wait()
                continue
            if not image.may_mount(self.clock()):
                raise MountFailed(f"{name}: {image.error}")
            image.begin_mount(self.clock())
            self._spawn(self._mount, name, "mount")

    async def _mount(self, name: str) -> None:
        image = self.registry[name]
        started = self.clock()
        self.metrics.inc("uenvfs_mount_attempts_total", image=name)
        try:
            mount = await self._make_mount(name)
        except Exception as exc:
            if not isinstance(exc, MountError):
                log.exception("%s: unexpected error while mounting", name)
            image.mount_failed(self.clock(), str(exc), self.config.negative_cache)
            self.metrics.inc("uenvfs_mount_failures_total", image=name)
            log.error("%s: mount failed: %s", name, exc)
        else:
            self.metrics.observe("uenvfs_mount_seconds", self.clock() - started)
            self.mounts[name] = mount
            image.mounted(self.clock())
            self.journal_soon()
            log.info("%s: mounted %s at %s (%s)", name, mount.image_path, mount.backing,
                     mount.source)
        finally:
            self._notify(name)

    async def _make_mount(self, name: str) -> Mount:
        path = await self.catalog.resolve(name)
        if path is None:
            raise MountFailed(f"{name} is no longer in any image source")
        self.paths[name] = path
        try:
            identity = identity_of(path)
        except OSError as exc:
            raise MountFailed(f"image {path}: {exc.strerror}") from exc
        target = self.config.backing_root / name
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MountFailed(f"cannot create {target}: {exc.strerror}") from exc
        tree = self._tree(name, identity)
        if self.config.validate and not tree.validated:
            await self._validate(path)
            tree.validated = True
        if is_mount_point(target):
            log.warning("%s: a stale mount sits at %s; detaching it first", name, target)
            await self.backend.unmount(target, lazy=True)
        await self.backend.mount(path, target)
        source = self.backend.mounted(target)
        if source is None:
            raise MountFailed(f"{self.backend.name} reported success but {target} is not mounted")
        return Mount(name, path, target, tree, source)

    async def _validate(self, path: Path) -> None:
        """Refuse a corrupt image with a clear reason, before the kernel sees it."""
        started = self.clock()
        try:
            problem = await squashfs.check_image(path, self.config.mount_timeout)
        except OSError as exc:
            raise MountFailed(f"image {path}: {exc.strerror}") from exc
        self.metrics.observe("uenvfs_check_seconds", self.clock() - started)
        if problem is not None:
            raise MountFailed(f"image {path} is not valid: {problem}")

    def _tree(self, name: str, identity: Identity) -> Tree:
        tree = self._trees.get(name)
        if tree is not None and tree.identity == identity:
            return tree
        new = self._trees[name] = Tree(self.new_slot(), identity)
        if tree is not None:
            log.info("%s: image file changed since its last mount; new inode numbers", name)
            self.on_stale_entry(name)
        return new

    def new_slot(self) -> int:
        """A number never handed out before in this daemon's life (for inode numbers)."""
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def _start_unmount(self, name: str) -> None:
        self._spawn(self._unmount, name, "unmount")

    async def _unmount(self, name: str) -> None:
        image = self.registry[name]
        mount = self.mounts[name]
        started = self.clock()
        try:
            try:
                await self._detach(mount)
            except Exception as exc:
                if not isinstance(exc, MountError):
                    log.exception("%s: unexpected error while unmounting", name)
                if self.backend.mounted(mount.backing) is not None:
                    image.unmount_failed(self.clock(), str(exc))
                    log.error("%s: unmount failed, retried after the hold time: %s", name, exc)
                    return
            del self.mounts[name]
            image.unmounted(self.clock())
            self.journal_soon()
            if not self.catalog.remembers(name):
                self.on_stale_entry(name)  # removed from the sources while it was mounted
            self.metrics.inc("uenvfs_unmounts_total", image=name)
            self.metrics.observe("uenvfs_unmount_seconds", self.clock() - started)
            log.info("%s: unmounted %s", name, mount.backing)
        finally:
            self._notify(name)

    async def _detach(self, mount: Mount) -> None:
        try:
            await self.backend.unmount(mount.backing)
        except UnmountFailed as exc:
            if "busy" not in str(exc).lower():
                raise
            log.info("%s: backing mount still busy (handles forgotten by release); "
                     "detaching it lazily", mount.name)
            await self.backend.unmount(mount.backing, lazy=True)

    async def _wait_settled(self, name: str) -> None:
        while self.registry[name].phase in (Phase.MOUNTING, Phase.UNMOUNTING):
            await self._event(name).wait()

    # -- uses ----------------------------------------------------------------------------

    def open(self, name: str, alloc: str) -> Use:
        """Count a handle of *alloc*. The image must be mounted (just after ensure_mounted)."""
        return self.registry[name].open(alloc, self.clock())

    def transfer(self, name: str, use: Use, alloc: str) -> Use | None:
        """Count one open of *use* for *alloc* instead (see Image.transfer)."""
        new = self.registry[name].transfer(use, alloc, self.clock())
        if new is not None:
            log.debug("%s: an executable of %s counts for %s now that it runs", name,
                      use.alloc, alloc)
        return new

    def close(self, name: str, use: Use) -> None:
        try:
            self.registry[name].close(use, self.clock())
        except RefcountInconsistency:
            self.metrics.inc("uenvfs_refcount_errors_total")
            log.exception("refcount bug on %s; continuing", name)
        self._wake_for(name)

    # -- commands ------------------------------------------------------------------------

    async def known(self, name: str) -> bool:
        """Whether *name* is an image: in a source now, or still mounted or listed."""
        image = self.registry.images.get(name)
        if image is not None and image.phase is not Phase.UNMOUNTED:
            return True
        return await self.catalog.resolve(name) is not None

    async def execute(self, command: Command) -> str:
        """Apply one `.control` command. Returns a short outcome; raises `CommandError`."""
        verb = command.verb.replace("-", "_")
        handler = getattr(self, f"_cmd_{verb}")
        result: str = await handler(command)
        return result

    async def _require_known(self, name: str) -> None:
        if not await self.known(name):
            raise CommandError(errno.ENOENT, f"no image named {name!r}")

    async def _cmd_acquire(self, cmd: Command) -> str:
        assert cmd.name
        assert cmd.alloc
        await self._require_known(cmd.name)
        while True:
            try:
                await self.ensure_mounted(cmd.name)
            except MountError as exc:
                raise CommandError(errno.EIO, str(exc)) from exc
            image = self.registry[cmd.name]
            if image.is_mounted:
                new = image.acquire(cmd.alloc, self.clock())
                await self.durable_journal()
                return "acquired" if new else "already acquired"

    async def _cmd_release(self, cmd: Command) -> str:
        assert cmd.alloc
        names = None if cmd.name is None else [cmd.name]
        if cmd.name is not None and cmd.alloc not in self.registry[cmd.name].users:
            raise CommandError(errno.ENOENT, f"{cmd.alloc} does not use {cmd.name}")
        left = self.registry.release(cmd.alloc, self.clock(), names)
        if not left:
            raise CommandError(errno.ENOENT, f"no image is used by {cmd.alloc}")
        self._wake()
        await self.durable_journal()
        return "released from " + ", ".join(left)

    async def _cmd_reconcile(self, cmd: Command) -> str:
        dropped = self.registry.reconcile(cmd.allocs, self.clock())
        for name, alloc in dropped:
            log.info("reconcile: %s no longer live, released from %s", alloc, name)
        self._wake()
        await self.durable_journal()
        return f"released {len(dropped)} stale uses"

    async def _cmd_expire(self, cmd: Command) -> str:
        if cmd.name is not None:
            await self._require_known(cmd.name)
            image = self.registry[cmd.name]
            if image.refcount:
                raise CommandError(errno.EPERM,
                                   f"{cmd.name} is in use by {image.refcount} allocations")
            names = [cmd.name]
        else:
            names = [i.name for i in self.registry if i.phase is Phase.HOLDING]
        return await self._expire(names)

    async def expire_idle(self) -> str:
        """Unmount now every image with refcount 0 (SIGUSR1, `expire`)."""
        return await self._expire([i.name for i in self.registry if i.phase is Phase.HOLDING])

    async def _expire(self, names: list[str]) -> str:
        started = []
        for name in names:
            await self._wait_settled(name)
            image = self.registry[name]
            if image.expire(self.clock(), self.registry.hold_time_of(image), force=True):
                log.info("%s: expired, unmounting", name)
                self._start_unmount(name)
                started.append(name)
        for name in started:
            await self._wait_settled(name)
        return f"expired {len(started)} images"

    async def _cmd_hold_time(self, cmd: Command) -> str:
        assert cmd.seconds is not None
        if cmd.name is None:
            self.registry.hold_time = cmd.seconds
        else:
            await self._require_known(cmd.name)
            self.registry[cmd.name].hold_time = cmd.seconds
        self._wake()
        return f"hold time {cmd.seconds:g} s"

    async def _cmd_emergency(self, cmd: Command) -> str:
        self.emergency = bool(cmd.on)
        if self.emergency:
            log.warning("emergency mode ON: force-unmount is allowed")
        else:
            log.info("emergency mode off")
        return "emergency " + ("on" if self.emergency else "off")

    async def _cmd_force_unmount(self, cmd: Command) -> str:
        assert cmd.name
        if not self.emergency:
            raise CommandError(errno.EPERM, "force-unmount is only allowed in emergency mode")
        await self._require_known(cmd.name)
        await self._wait_settled(cmd.name)
        image = self.registry[cmd.name]
        if not image.is_mounted:
            return f"{cmd.name} is not mounted"
        dropped = image.force_unmount(self.clock())
        log.warning("%s: FORCE-UNMOUNT, dropping allocations %s", cmd.name, dropped or "none")
        await self.on_force_unmount(cmd.name)
        self._start_unmount(cmd.name)
        await self._wait_settled(cmd.name)
        await self.durable_journal()
        return f"force-unmounted {cmd.name}"

    async def _cmd_reload(self, cmd: Command) -> str:
        return self.reload()

    def reload(self) -> str:
        before = set(self.catalog.listing())
        self.catalog.refresh()
        after = set(self.catalog.listing())
        self.on_listing_changed(before ^ after)
        return f"{len(after)} images ({len(after - before)} added, {len(before - after)} removed)"

    # -- journal and recovery -------------------------------------------------------------

    def journal_state(self) -> Journal:
        """What must survive a crash: the backing mounts and the allocations that acquired them."""
        records = {}
        for name, mount in self.mounts.items():
            acquired = tuple(a for a, u in self.registry[name].users.items() if u.acquired)
            records[name] = MountRecord(str(mount.image_path), str(mount.backing),
                                        mount.tree.identity, acquired, mount.mounted_at)
        return Journal(records)

    def save_journal(self, state: Journal | None = None) -> None:
        """Write the journal now. A failure is logged, never fatal: the mount table remains."""
        try:
            journal.save(self.config.journal_path, state or self.journal_state())
        except OSError as exc:
            self.metrics.inc("uenvfs_journal_errors_total")
            log.warning("cannot write the journal %s: %s", self.config.journal_path, exc)

    def journal_soon(self) -> int:
        """Have the journal writer record the current state; returns its generation.

        A mount need not wait for its journal entry (the mount table says it exists, and a
        crash before the write only loses nothing the table cannot tell), so the fsync stays
        out of the path of the first access.
        """
        self._journal_wanted += 1
        self._journal_wake.set()
        return self._journal_wanted

    async def durable_journal(self) -> None:
        """Record the current state and wait until it is on disk (an acquisition must be)."""
        self._journal_urgent = True
        wanted = self.journal_soon()
        while self._journal_done < wanted:
            await self._journal_written.wait()

    async def _journal_writer(self) -> None:
        while True:
            await self._journal_wake.wait()
            if not self._journal_urgent:
                # Let the access that mounted finish first, and gather a burst of changes.
                await trio.sleep(JOURNAL_DELAY)
            self._journal_urgent = False
            self._journal_wake = trio.Event()
            generation = self._journal_wanted
            state = self.journal_state()  # a snapshot, taken in the loop
            if self._journal_in_thread:
                await trio.to_thread.run_sync(self.save_journal, state)
            else:
                self.save_journal(state)
            self._journal_done = generation
            written, self._journal_written = self._journal_written, trio.Event()
            written.set()

    def adopt(self, found: Adoption) -> None:
        """Serve a backing mount found at start-up: refcount 0 and its hold timer, plus the
        acquisitions the journal remembers."""
        name, record = found.name, found.record
        now = self.clock()
        path = Path(found.image_path) if found.image_path else self.catalog.lookup_listed(name)
        identity = record.identity if record and record.identity else None
        if identity is None:
            try:
                identity = identity_of(path) if path else (0, 0, 0, 0)
            except OSError:
                identity = (0, 0, 0, 0)
        image = self.registry[name]
        image.begin_mount(now)
        image.mounted(now)
        if path is not None:
            self.paths[name] = path
        mounted_at = record.mounted_at if record and record.mounted_at else time.time()
        self.mounts[name] = Mount(name, path or Path(), found.backing, self._tree(name, identity),
                                  found.source, mounted_at)
        for alloc in record.acquired if record else ():
            image.acquire(alloc, now)
        log.info("%s: adopted %s at %s (%s)%s", name, path or "an unknown image",
                 found.backing, found.source,
                 f", acquired by {', '.join(record.acquired)}" if record and record.acquired
                 else "")
        self._wake()

    # -- status and shutdown ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock()
        mounts = []
        for image in self.registry:
            if image.phase is Phase.UNMOUNTED:
                continue
            mount = self.mounts.get(image.name)
            deadline = self.registry.deadline(image)
            state = image.phase.value
            if image.phase is Phase.UNMOUNTING:
                state, deadline = Phase.HOLDING.value, now
            path = self.paths.get(image.name)
            mounts.append(MountStatus(
                name=image.name,
                image_path=str(path) if path else "",
                mount_point=str(self.config.mountpoint / image.name),
                backing=str(self.config.backing_root / image.name),
                state=state,
                refcount=image.refcount,
                allocations={a: (u.opens, u.acquired) for a, u in image.users.items()},
                hold_remaining=None if deadline is None else max(0.0, deadline - now),
                mounted_at=iso_time(mount.mounted_at) if mount else None,
                error=image.error,
            ))
        return control.status_document(str(self.config.mountpoint), self.registry.hold_time,
                                       self.emergency, mounts)

    async def shutdown(self) -> None:
        """Unmount every idle image; acquired images stay mounted for the next daemon to adopt."""
        for image in self.registry:
            await self._wait_settled(image.name)
        await self.expire_idle()
        await self.durable_journal()
        for image in self.registry:
            if image.is_mounted:
                log.info("%s: acquired by %s; left mounted at %s for the next start",
                         image.name, ", ".join(image.users), self.mounts[image.name].backing)


async def _nothing(name: str) -> None:
    pass
