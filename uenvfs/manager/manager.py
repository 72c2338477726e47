"""The mount manager: the lifecycle of every image's backing mount, driving the pure state
machine (core/state.py) with real mounts.

One trio task per mount or unmount (`mount:<name>`, `unmount:<name>`), plus the hold timer
(`hold-timer`, see hold_timer.py) and the journal writer (`journal`, see journal_writer.py).
Callers never run a mount tool themselves: they start the task if needed and wait for the
image's change event, so concurrent first accesses produce exactly one mount and a cancelled
caller never leaves a half-made mount behind.

The uses that keep an image mounted are counted in counts.py; the hold times come from the
`Settings` the manager shares with the rest of the server (core/settings.py). What the
filesystem sees of the manager is in images.py, what `.control` commands do in executor.py,
reload and restart in reconfigure.py: the daemon makes each with the parts it uses.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import ChainMap
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import trio

from ..core.config import Config
from ..core.errors import JournalWriteFailed, MountError, MountFailed
from ..core.interfaces import MountListener, NoListener
from ..core.metrics import Metrics
from ..core.model import InodePrefixes, Mount
from ..core.owners import Owners
from ..core.registry import Registry
from ..core.settings import Settings
from ..core.state import Phase
from ..core.status import iso_time
from ..image.catalog import Catalog
from . import journal
from .backend import MountBackend
from .counts import Counts
from .hold_timer import HoldTimer
from .journal_writer import JournalWriter
from .mounting import Mounter
from .recovery import Adoption

log = logging.getLogger(__name__)


class Manager:
    """Every image's backing mount and its lifecycle: mount, hold time, unmount. It owns the
    state machine (`registry`), the hold timer, the journal writer and the use counts.

    Invariants: `mounts` holds the mount of exactly the images that are MOUNTED or HOLDING
    (they serve requests), `_unmounting` that of exactly the images UNMOUNTING. Whatever moves
    an image into or out of those phases moves its mount in the same step (no await between),
    so whether an image is mounted is one lookup in `mounts` (never replaced: images.py binds
    its `get`). An image's state changes only by the events of
    the state machine (`registry`).
    """

    def __init__(
        self,
        config: Config,
        backend: MountBackend,
        catalog: Catalog,
        settings: Settings,
        clock: Callable[[], float] = trio.current_time,
        *,
        threads: bool = True,
        prefixes: InodePrefixes | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.catalog = catalog
        self.settings = settings
        self.clock = clock
        self.registry = Registry(settings)
        self.metrics = metrics or Metrics()
        self.mounts: dict[str, Mount] = {}  # serving: MOUNTED or HOLDING
        self._unmounting: dict[str, Mount] = {}  # being detached by their unmount task
        self.backing_mounts = ChainMap(self.mounts, self._unmounting)  # every one of them
        # Inode prefixes are shared with the filesystem, which numbers image directories too.
        # File I/O goes to worker threads (*threads*); tests in virtual time keep it in the
        # loop, since trio's autojump clock would jump while a thread works.
        self.mounter = Mounter(config, backend, catalog, self.metrics,
                               prefixes or InodePrefixes(), clock,
                               lambda name: self.listener.entry_stale(name), threads=threads)
        self._changed: dict[str, trio.Event] = {}
        self.timer = HoldTimer(self.registry, self._start_unmount, clock, self._check_uses)
        self.owners = Owners(self.registry.allocations)  # whose each allocation in use is
        snapshot = functools.partial(journal.snapshot, self.registry, self.backing_mounts,
                                     settings, self.owners)
        self.journal = JournalWriter(config.journal_path, snapshot, self.metrics,
                                     in_thread=threads)
        self.counts = Counts(self.registry, self.timer, self.journal, self.metrics, clock,
                             self.owners)
        self._nursery: trio.Nursery | None = None
        self.listener: MountListener = NoListener()  # until `listen`

    def listen(self, listener: MountListener) -> None:
        """Tell *listener*, the filesystem's, what happens to images from now on (its handles
        must die, its cached names go stale).

        The one cycle of the server's parts: the filesystem is made with the manager's side
        (images.py: it asks for mounts and counts its uses), and the manager tells it the
        news. The daemon closes it here, once, after making both and before anything is
        served.
        """
        self.listener = listener

    def configure(self, config: Config) -> None:
        """Take *config*, which differs in what can change live only (a reload)."""
        self.config = self.mounter.config = config
        self.backend.timeout = config.mount_timeout

    # -- tasks ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the hold timer and the journal writer, and host the mount and unmount tasks,
        until cancelled."""
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

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object, task: str) -> None:
        """Run *fn* as a task of the manager (it outlives the request that started it)."""
        assert self._nursery is not None, "Manager.run() is not running"
        self._nursery.start_soon(fn, *args, name=task)
    # -- mounting ------------------------------------------------------------------------

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
            self.spawn(self._mount, name, task=f"mount:{name}")
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
        self.spawn(self._unmount, name, task=f"unmount:{name}")

    async def _unmount(self, name: str, lazy: bool = False) -> None:
        image = self.registry[name]
        mount = self._unmounting[name]
        started = self.clock()
        try:
            try:
                await self.mounter.detach(mount, lazy=lazy)
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

    # -- uses the filesystem does not see ------------------------------------------------

    async def _check_uses(self) -> None:
        """Count the processes sitting in images now, before anything is unmounted."""
        await self.listener.check_uses(0.0)

    async def verify(self, level: int = logging.WARNING) -> str:
        """Compare every count with a full scan of the processes; kept for `.status`. Each
        difference is logged at *level*."""
        differences = await self.listener.verify()
        self.settings.verify = {"at": iso_time(time.time()), "differences": differences}
        for text in differences:
            log.log(level, "verify: %s", text)
        if not differences:
            return "every count agrees with the processes"
        return f"{len(differences)} difference(s) from the processes"

    # -- what commands and reloads ask for ---------------------------------------------------

    def hold_times_changed(self) -> None:
        """A hold time of the settings changed: the hold timer looks at its deadlines again,
        and the journal is written shortly."""
        self.timer.wake()
        self.journal.soon()

    async def durable(self) -> None:
        """Wait until the journal has the state as of now (a setting made by command must
        outlive a restart, as an acquisition does). Raises `JournalWriteFailed`."""
        await self.journal.durable()

    def sources_changed(self, names: Iterable[str]) -> None:
        """*names* were added to or removed from the image sources (a reload)."""
        self.listener.listing_changed(names)

    async def expire_idle(self) -> str:
        """Unmount now every image with refcount 0 (SIGUSR1, `expire`, shutdown)."""
        await self._check_uses()  # first: a tree handed out may have gone since
        return await self._expire([i.name for i in self.registry if i.phase is Phase.HOLDING])

    async def expire(self, names: list[str]) -> str:
        """Unmount now each of *names* that is idle, whatever its hold time."""
        await self._check_uses()  # a process sitting in an image keeps it
        return await self._expire(names)

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

    async def force_unmount(self, name: str) -> str:
        """Emergency: unmount *name* whatever its refcount, its open handles killed first.

        Our backing mount is detached at once (lazily). A mount namespace holding a mount of
        the image keeps its tree (the kernel keeps the image's superblock and loop device until
        the last such mount goes): the listener names each holder in the log. A new access
        mounts the image anew, beside them."""
        await self._wait_settled(name)
        await self._check_uses()  # the allocations dropped are logged: count them all
        image = self.registry[name]
        if not image.is_mounted:
            return f"{name} is not mounted"
        dropped = image.force_unmount(self.clock())
        self.owners.prune()
        self._stop_serving(name)
        log.warning("%s: FORCE-UNMOUNT, dropping allocations %s", name, dropped or "none")
        await self.listener.force_unmounted(name)
        self.spawn(self._unmount, name, True, task=f"unmount:{name}")  # lazily, at once
        await self._wait_settled(name)
        await self.journal.durable()
        return f"force-unmounted {name}"

    # -- start, state, shutdown ------------------------------------------------------------

    def adopt(self, found: Adoption) -> None:
        """Serve a backing mount found at start-up: refcount 0 and its hold timer, plus the
        acquisitions the journal remembers, with their owners."""
        name, record = found.name, found.record
        now = self.clock()
        path = Path(found.image_path) if found.image_path else self.catalog.lookup_listed(name)
        mount = self.mounter.adopted(
            name, path, record.identity if record and record.identity else None,
            found.backing, found.source, found.device, record.mounted_at if record else None)
        image = self.registry[name]
        image.begin_mount(now)
        image.mounted(now)
        self.mounts[name] = mount
        owners = record.owners if record else {}
        for alloc in record.acquired if record else ():
            image.acquire(alloc, now)
            if alloc in owners:
                self.owners.learn(alloc, owners[alloc], "the journal")
        log.info("%s: adopted %s at %s (%s)%s", name, path or "an unknown image",
                 found.backing, found.source,
                 f", acquired by {', '.join(record.acquired)}" if record and record.acquired
                 else "")
        self.timer.wake()

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
                log.info("%s: used by %s; left mounted at %s for the next start", image.name,
                         ", ".join(image.users) or "none since the last look",
                         self.mounts[image.name].backing)
