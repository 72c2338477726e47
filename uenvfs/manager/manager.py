"""The mount manager: drives the pure state machine with real mounts.

One trio task per mount or unmount (`mount:<name>`, `unmount:<name>`), plus the hold timer
(`hold-timer`, see hold_timer.py) and the journal writer (`journal`, see journal_writer.py).
Callers never run a mount tool themselves: they start the task if needed and wait for the
image's change event, so concurrent first accesses produce exactly one mount and a cancelled
caller never leaves a half-made mount behind. What `.control` commands do is in executor.py.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import ChainMap
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import trio

from ..core import config as config_mod
from ..core.config import Config, ConfigError
from ..core.control import Command
from ..core.errors import (
    CommandError,
    JournalWriteFailed,
    MountError,
    MountFailed,
    RefcountInconsistency,
)
from ..core.interfaces import MountListener, NoListener
from ..core.metrics import Metrics
from ..core.model import InodePrefixes, Mount
from ..core.state import Phase, Registry, Use
from ..core.status import (
    Server,
    iso_time,
    mount_statuses,
    status_document,
)
from ..image.catalog import Catalog
from .backend import MountBackend
from .executor import Executor
from .hold_timer import HoldTimer
from .journal import Journal, MountRecord
from .journal_writer import JournalWriter
from .mounting import Mounter
from .recovery import Adoption

log = logging.getLogger(__name__)



class Manager:
    """Every image's backing mount and its lifecycle: mount, uses, hold time, unmount.

    Invariants: `mounts` holds the mount of exactly the images that are MOUNTED or HOLDING
    (they serve requests), `_unmounting` that of exactly the images UNMOUNTING. Whatever moves
    an image into or out of those phases moves its mount in the same step (no await between),
    so `mounted(name)` is one dict lookup.
    """

    def __init__(
        self,
        config: Config,
        backend: MountBackend,
        catalog: Catalog,
        clock: Callable[[], float] = trio.current_time,
        *,
        threads: bool = True,
        prefixes: InodePrefixes | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.catalog = catalog
        self.clock = clock
        self.registry = Registry(config.hold_time)
        # The global hold time set by `hold-time` (None: the configured one). It is journaled,
        # so it outlives a restart; a reload that changes the configured one replaces it.
        self.hold_time_set: float | None = None
        self.metrics = Metrics()
        self.mounts: dict[str, Mount] = {}  # serving: MOUNTED or HOLDING
        self._unmounting: dict[str, Mount] = {}  # being detached by their unmount task
        # Inode prefixes are shared with the filesystem, which numbers image directories too.
        # File I/O goes to worker threads (*threads*); tests in virtual time keep it in the
        # loop, since trio's autojump clock would jump while a thread works.
        self.mounter = Mounter(config, backend, catalog, self.metrics,
                               prefixes or InodePrefixes(), clock,
                               lambda name: self.listener.entry_stale(name), threads=threads)
        self._changed: dict[str, trio.Event] = {}
        self.timer = HoldTimer(self.registry, self._start_unmount, clock, self._check_uses)
        self._wake_for = self.timer.wake_for  # bound once: close() calls it on every release
        self.journal = JournalWriter(config.journal_path, self.journal_state, self.metrics,
                                     in_thread=threads)
        self.executor = Executor(self)
        self._nursery: trio.Nursery | None = None
        # The filesystem: an image's handles must die / its cached names go stale.
        self.listener: MountListener = NoListener()
        self.last_verify: dict[str, Any] | None = None  # the last `verify`: when, what differed
        self.server: Server | None = None  # the process serving (set by the daemon)
        self.restarter: Callable[[], None] | None = None  # asks the keeper for a new server
        # Reads the configuration file again (with the command line's flags), for `reload`.
        self.reread_config: Callable[[], Config] | None = None

    # -- tasks ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the hold timer and the journal writer, and host the mount and unmount tasks,
        until cancelled."""
        if self.clock is trio.current_time:
            # The same clock without trio's lookups on every call (every open and close).
            self.clock = trio.lowlevel.current_clock().current_time
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.timer.run, name="hold-timer")
            nursery.start_soon(self.journal.run, name="journal")
            task_status.started()

    def _event(self, name: str) -> trio.Event:
        event = self._changed.get(name)
        if event is None:
            event = self._changed[name] = trio.Event()
        return event

    def _notify(self, name: str) -> None:
        self._changed.pop(name, trio.Event()).set()
        self.timer.wake()

    def _spawn(self, fn: Callable[[str], Awaitable[object]], name: str, task: str) -> None:
        self.spawn(fn, name, task=f"{task}:{name}")

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object, task: str) -> None:
        """Run *fn* as a task of the manager (it outlives the request that started it)."""
        assert self._nursery is not None, "Manager.run() is not running"
        self._nursery.start_soon(fn, *args, name=task)

    # -- mounting ------------------------------------------------------------------------

    def mounted(self, name: str) -> Mount | None:
        """The backing mount of *name* if it is mounted now (no mounting)."""
        return self.mounts.get(name)

    def has_backing_mount(self, name: str) -> bool:
        """Whether a backing mount of *name* exists (serving, or being unmounted)."""
        return name in self.mounts or name in self._unmounting

    def listed_names(self) -> Collection[str]:
        """The names the mount root lists: those of the listable image sources."""
        return self.catalog.listing().keys()

    def alias_of(self, name: str) -> str | None:
        """The image that the label name *name* stands for (a symlink in the root), or None."""
        return self.catalog.alias(name)

    def aliases(self) -> dict[str, str]:
        """Every label name the root lists, with the image it stands for."""
        return self.catalog.aliases()

    async def ensure_mounted(self, name: str) -> Mount:
        """The backing mount of *name*, mounting it first if needed.

        Raises `MountFailed` (EIO) if the mount fails or failed less than the negative cache
        time ago.
        """
        tried = False  # a caller sees one attempt fail, never a loop of them
        while True:
            mount = self.mounts.get(name)
            if mount is not None:
                return mount
            image = self.registry[name]
            if image.phase in (Phase.MOUNTING, Phase.UNMOUNTING):
                tried = tried or image.phase is Phase.MOUNTING
                await self._event(name).wait()
                continue
            if image.phase is Phase.FAILED and (tried or not image.may_mount(self.clock())):
                raise MountFailed(f"{name}: {image.error}")
            image.begin_mount(self.clock())
            self._spawn(self._mount, name, "mount")
            tried = True

    async def _mount(self, name: str) -> None:
        image = self.registry[name]
        started = self.clock()
        self.metrics.inc("uenvfs_mount_attempts_total", image=name)
        try:
            mount = await self.mounter.mount(name)
        except Exception as exc:
            if not isinstance(exc, MountError):
                log.exception("%s: unexpected error while mounting", name)
            transient = isinstance(exc, MountFailed) and exc.transient
            # A failure of this node (disk full, no descriptors) is tried again at the next
            # access; one of the image is remembered for the negative-cache time.
            image.mount_failed(self.clock(), str(exc),
                               0.0 if transient else self.config.negative_cache)
            self.metrics.inc("uenvfs_mount_failures_total", image=name)
            log.error("%s: mount failed: %s", name, exc)
        else:
            self.metrics.observe("uenvfs_mount_seconds", self.clock() - started)
            self.mounts[name] = mount
            image.mounted(self.clock())
            self.journal.soon()
            log.info("%s: mounted %s at %s (%s)", name, mount.image_path, mount.backing,
                     mount.source)
        finally:
            self._notify(name)

    def _stop_serving(self, name: str) -> None:
        """*name* just became UNMOUNTING: its mount no longer serves requests."""
        self._unmounting[name] = self.mounts.pop(name)

    def _start_unmount(self, name: str) -> None:
        """*name* just became UNMOUNTING: detach its mount in a task."""
        self._stop_serving(name)
        self._spawn(self._unmount, name, "unmount")

    async def _unmount(self, name: str) -> None:
        image = self.registry[name]
        mount = self._unmounting[name]
        started = self.clock()
        try:
            try:
                await self.mounter.detach(mount)
            except Exception as exc:
                if not isinstance(exc, MountError):
                    log.exception("%s: unexpected error while unmounting", name)
                if self.mounter.still_mounted(mount):
                    image.unmount_failed(self.clock(), str(exc))
                    self.mounts[name] = self._unmounting.pop(name)
                    log.error("%s: unmount failed, retried after the hold time: %s", name, exc)
                    return
            del self._unmounting[name]
            image.unmounted(self.clock())
            self.journal.soon()
            if not self.catalog.remembers(name):
                self.listener.entry_stale(name)  # removed from the sources while it was mounted
            self.metrics.inc("uenvfs_unmounts_total", image=name)
            self.metrics.observe("uenvfs_unmount_seconds", self.clock() - started)
            log.info("%s: unmounted %s", name, mount.backing)
        finally:
            self._notify(name)

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
        image = self.registry[name]
        try:
            image.close(use, self.clock())
        except RefcountInconsistency:
            self.metrics.inc("uenvfs_refcount_errors_total")
            log.exception("refcount bug on %s; continuing", name)
        self._wake_for(image)

    def sitting(self, found: Mapping[str, Mapping[str, int]]) -> bool:
        """A scan found these processes sitting in images: count them (see uses.py)."""
        changed = self.registry.sitting(found, self.clock())
        for image in changed:
            log.debug("%s: processes sitting there: %s", image.name,
                      {u.alloc: u.cwd for u in image.users.values() if u.cwd} or "none")
        if changed:
            self.timer.wake()
        return any(u.cwd for i in self.registry if i.is_mounted for u in i.users.values())

    async def _check_uses(self) -> None:
        """Count the processes sitting in images now, before anything is unmounted."""
        await self.listener.check_uses(0.0)

    async def verify(self, level: int = logging.WARNING) -> str:
        """Compare every count with a full scan of the processes; kept for `.status`. Each
        difference is logged at *level*."""
        differences = await self.listener.verify()
        self.last_verify = {"at": iso_time(time.time()), "differences": differences}
        for text in differences:
            log.log(level, "verify: %s", text)
        if not differences:
            return "every count agrees with the processes"
        return f"{len(differences)} difference(s) from the processes"

    # -- commands, and the lifecycle steps they ask for --------------------------------------

    async def known(self, name: str, uid: int = 0) -> bool:
        """Whether *name* is an image: in a source now, or still mounted or listed. *uid* asks
        (a program map's time is shared out between users)."""
        image = self.registry.images.get(name)
        if (image is not None and image.phase is not Phase.UNMOUNTED) or self.alias_of(name):
            return True
        refused = self.catalog.refused
        path = await self.catalog.resolve(name, uid)
        if self.catalog.refused > refused:
            self.metrics.inc("uenvfs_program_map_refused_total", uid=str(uid))
            self.metrics.inc("uenvfs_program_map_refusals_total")
        return path is not None

    async def execute(self, command: Command) -> str:
        """Apply one `.control` command. Returns a short outcome; raises `CommandError`."""
        return await self.executor.execute(command)

    async def expire_idle(self) -> str:
        """Unmount now every image with refcount 0 (SIGUSR1, `expire`)."""
        return await self.expire([i.name for i in self.registry if i.phase is Phase.HOLDING])

    async def expire(self, names: list[str]) -> str:
        """Unmount now each of *names* that is idle, whatever its hold time."""
        await self._check_uses()  # a process sitting in an image keeps it
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

    async def force_unmount(self, name: str) -> str:
        """Emergency: unmount *name* whatever its refcount, its open handles killed first."""
        await self._wait_settled(name)
        await self._check_uses()  # the allocations dropped are logged: count them all
        image = self.registry[name]
        if not image.is_mounted:
            return f"{name} is not mounted"
        dropped = image.force_unmount(self.clock())
        self._stop_serving(name)
        log.warning("%s: FORCE-UNMOUNT, dropping allocations %s", name, dropped or "none")
        await self.listener.force_unmounted(name)
        self._spawn(self._unmount, name, "unmount")
        await self._wait_settled(name)
        await self.journal.durable()
        return f"force-unmounted {name}"

    async def restart(self) -> str:
        """Have a new server started from the installed code take over (see keeper.py).

        Refused (EINVAL) if the configuration file changes what only a stop and start can
        (`config.CONNECTION`): the new server would serve the old connection with them. (A
        file that cannot be used is the new server's to refuse: it exits, and the restart
        fails with `restart_error` in `.status`.)"""
        if self.restarter is None:
            raise CommandError(errno.EOPNOTSUPP, "this server has no keeper to restart it")
        try:
            read = await self._read_config()
        except ConfigError:
            read = None  # the new server's to refuse
        if read is not None and read[1].connection:
            raise CommandError(errno.EINVAL, "the configuration changes what only a stop and "
                               f"start of uenvfs can: {'; '.join(read[1].connection)}; "
                               "no restart")
        self.restarter()
        return "a new server takes over once it is ready"

    async def reload(self) -> str:
        """Re-read the configuration file, apply what can change live, then re-read the
        image sources. A configuration that cannot be used changes nothing (EINVAL)."""
        configured = await self._reconfigure()
        return configured + await self._reread_sources()

    async def _read_config(self) -> tuple[Config, config_mod.Changes] | None:
        """The configuration file read again (in a thread), and how it differs from the one in
        force; None without a file to read. Raises `ConfigError`."""
        if self.reread_config is None:
            return None
        new = await trio.to_thread.run_sync(self.reread_config)
        return new, config_mod.changes(config_mod.as_json(self.config), config_mod.as_json(new))

    async def _reconfigure(self) -> str:
        try:
            read = await self._read_config()
        except ConfigError as exc:
            raise CommandError(errno.EINVAL, f"{exc}; nothing changed") from exc
        if read is None:
            return ""
        new, found = read
        if found.live:
            self._apply_config(new, found.keys("live"))
            log.info("reload: configuration applied: %s", "; ".join(found.live))
        if found.restart:
            log.warning("reload: configuration changes that take a new server (uenvfs "
                        "restart, or systemctl reload uenvfs): %s", "; ".join(found.restart))
        if found.connection:
            log.warning("reload: configuration changes that take a stop and start of uenvfs "
                        "(it unmounts: release every image first): %s",
                        "; ".join(found.connection))
        waiting = len(found.restart) + len(found.connection)
        return (f"configuration: {len(found.live)} changes applied"
                + (f", {waiting} need a restart (see the log)" if waiting else "") + "; ")

    def _apply_config(self, new: Config, keys: Collection[str]) -> None:
        """Take the live keys of *new* (`config.LIVE`) that changed, *keys*."""
        self.config = self.mounter.config = config_mod.live_part(self.config, new)
        self.catalog.configure(self.config)
        self.backend.timeout = self.config.mount_timeout
        if "hold_time" in keys:
            if self.hold_time_set is not None:
                log.info("the configured hold time replaces the one set by hold-time (%g s)",
                         self.hold_time_set)
            self.registry.hold_time, self.hold_time_set = self.config.hold_time, None
            self.timer.wake()
            self.journal.soon()
        if "log_level" in keys:
            logging.getLogger().setLevel(self.config.log_level.upper())

    async def _reread_sources(self) -> str:
        before, links = set(self.catalog.listing()), self.catalog.aliases()
        if await self.catalog.reread() is None:
            raise CommandError(errno.EIO, f"image sources gave no answer in "
                               f"{self.catalog.source_timeout:g} s; kept the listing of "
                               f"{len(before)} images")
        after, now = set(self.catalog.listing()), self.catalog.aliases()
        moved = {name for name in links.keys() | now.keys() if links.get(name) != now.get(name)}
        self.listener.listing_changed((before ^ after) | moved)
        return f"{len(after)} images ({len(after - before)} added, {len(before - after)} removed)"

    # -- journal and recovery -------------------------------------------------------------

    def journal_state(self) -> Journal:
        """What must survive a crash: the backing mounts, the allocations that acquired them,
        and the settings made by command (hold times, emergency mode)."""
        records = {}
        for mounts in (self.mounts, self._unmounting):
            for name, mount in mounts.items():
                acquired = tuple(a for a, u in self.registry[name].users.items() if u.acquired)
                records[name] = MountRecord(str(mount.image_path), str(mount.backing),
                                            mount.version.identity, acquired, mount.mounted_at)
        hold_times = {i.name: i.hold_time for i in self.registry if i.hold_time is not None}
        configured = None if self.hold_time_set is None else self.config.hold_time
        return Journal(records, self.hold_time_set, configured, hold_times,
                       self.executor.emergency)

    def restore_settings(self, found: Journal) -> None:
        """Take back the settings made by command before a restart (see `journal_state`)."""
        configured = self.config.hold_time
        if found.hold_time is not None and found.hold_time_configured not in (None, configured):
            log.info("hold time %g s, as configured now (hold-time had set %g s when %g s was "
                     "configured)", configured, found.hold_time, found.hold_time_configured)
        elif found.hold_time is not None:
            self.hold_time_set = self.registry.hold_time = found.hold_time
            log.info("hold time %g s, as set by hold-time before the restart (configured: %g s)",
                     found.hold_time, configured)
        for name, seconds in found.hold_times.items():
            self.registry[name].hold_time = seconds
        if found.hold_times:
            log.info("hold times of single images, as set before the restart: %s",
                     ", ".join(f"{n} {s:g} s" for n, s in sorted(found.hold_times.items())))
        if found.emergency:
            self.executor.emergency = True
            log.warning("emergency mode ON, as before the restart: force-unmount is allowed")

    def adopt(self, found: Adoption) -> None:
        """Serve a backing mount found at start-up: refcount 0 and its hold timer, plus the
        acquisitions the journal remembers."""
        name, record = found.name, found.record
        now = self.clock()
        path = Path(found.image_path) if found.image_path else self.catalog.lookup_listed(name)
        mount = self.mounter.adopted(
            name, path, record.identity if record and record.identity else None,
            found.backing, found.source, record.mounted_at if record else None)
        image = self.registry[name]
        image.begin_mount(now)
        image.mounted(now)
        self.mounts[name] = mount
        for alloc in record.acquired if record else ():
            image.acquire(alloc, now)
        log.info("%s: adopted %s at %s (%s)%s", name, path or "an unknown image",
                 found.backing, found.source,
                 f", acquired by {', '.join(record.acquired)}" if record and record.acquired
                 else "")
        self.timer.wake()

    # -- status and shutdown ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The `.status` document."""
        mounts = mount_statuses(
            self.registry, self.clock(), mountpoint=self.config.mountpoint,
            backing_root=self.config.backing_root, image_paths=self.mounter.paths,
            mounts=ChainMap[str, Mount](self.mounts, self._unmounting), labels=self._labels())
        return status_document(str(self.config.mountpoint), self.registry.hold_time,
                               self.executor.emergency, mounts, self.last_verify, self.server)

    def _labels(self) -> dict[str, list[str]]:
        """The uenv labels of each repository image (by its served name, the id)."""
        labels: dict[str, list[str]] = {}
        for record in self.catalog.records():
            labels.setdefault(record.id, []).append(record.label)
        return {name: sorted(found) for name, found in labels.items()}

    async def shutdown(self) -> None:
        """Unmount every idle image; acquired images stay mounted for the next daemon to adopt."""
        for image in self.registry:
            await self._wait_settled(image.name)
        await self.expire_idle()
        try:
            await self.journal.durable()
        except JournalWriteFailed as exc:
            log.error("at shutdown: %s", exc)
        for image in self.registry:
            if image.is_mounted:
                log.info("%s: acquired by %s; left mounted at %s for the next start",
                         image.name, ", ".join(image.users), self.mounts[image.name].backing)

