"""Wiring of `uenvfs serve`: start-up, the trio nursery, signals, and shutdown.

Start-up clears a FUSE mount left by a killed daemon, mounts the filesystem (it is ready from
then on), and serves until SIGTERM/SIGINT or an external unmount. SIGHUP is a `reload` (the
configuration file, then the image sources), SIGUSR1 expires idle mounts. Shutdown unmounts
the FUSE filesystem and every idle backing mount; a mount still in use stays for the next
daemon to adopt.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pyfuse3
import trio

from ..core import ledger as ledger_mod
from ..core.cgroups import parse_layouts
from ..core.config import Config
from ..core.errors import CommandError, MountError, StartupError
from ..core.metrics import Metrics
from ..core.model import InodePrefixes
from ..core.settings import Settings
from ..core.shared_ledger import SharedLedger
from ..core.status import Server
from ..core.status import summary as status_summary
from ..fuse import fastloop
from ..fuse.allocation import AllocationResolver
from ..fuse.descriptors import DescriptorBudget
from ..fuse.fs import UenvFS
from ..fuse.shares import HandleShares
from ..image import squashfs
from ..image.catalog import Catalog
from ..keeper.protocol import (
    ENV_DIED,
    ENV_HEARTBEAT,
    ENV_KEEPER,
    ENV_RESUME,
    ENV_SOCKET,
    ENV_STANDBY,
    HANDED,
    HEARTBEAT,
    STATUS,
    STOPPING,
)
from ..keeper.serve import setup_logging
from ..kernel import fusedev, mountinfo
from ..manager import journal, recovery
from ..manager.backend import make_backend
from ..manager.executor import Executor
from ..manager.images import Images
from ..manager.manager import Manager
from ..manager.reconfigure import Reconfigure
from . import handover, queries
from .link import Link
from .ownership import clear_stale_mount, lock_state_dir
from .resume import (
    Death,
    Resume,
    read_handed,
    read_ledger,
    restore_handles,
    restore_versions,
)

log = logging.getLogger(__name__)

# Requests answered at once. pyfuse3's default, 99, let 120 processes waiting for one image's
# first mount stall every other image; each waiting request costs a task and a receive buffer
# (1 MiB of address space, of which it touches only what the request needs).
MAX_REQUESTS = 1000
DRAIN = 1.0  # seconds an old server lets its requests finish before it hands over
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


async def _tune_after_init(fs: UenvFS, config: Config) -> None:
    # The kernel sets the mount's readahead when it gets the INIT reply: change it after.
    await fs.initialized.wait()
    await trio.lowlevel.checkpoint()
    if config.read_ahead_kb:
        fusedev.set_read_ahead(config.mountpoint, config.read_ahead_kb)


def _prepare_dirs(config: Config, resuming: bool) -> None:
    """The directories uenvfs needs; not the mountpoint when resuming: it is our live mount,
    and a stat of it would wait for this very process. The state directory is traversable by
    all, for its query socket."""
    mountpoint = () if resuming else (config.mountpoint,)
    for directory in (config.state_dir, config.backing_root, *mountpoint):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create {directory}: {exc.strerror}") from exc
        if not stat.S_ISDIR(directory.stat().st_mode):
            raise StartupError(f"{directory} is not a directory")
    try:
        config.state_dir.chmod(0o755)
    except OSError as exc:
        raise StartupError(f"cannot make {config.state_dir} mode 0755: {exc.strerror}") from exc


async def recover(manager: Manager, settings: Settings) -> None:
    """Rebuild the state from the kernel's mount table and the journal (invariant WI6 of
    docs/interface.md: nothing is mounted twice, no acquisition is lost)."""
    config = manager.config
    try:
        found = journal.load(config.journal_path)
    except journal.JournalError as exc:
        log.warning("journal %s unreadable (%s): recovering from the mount table alone",
                    config.journal_path, exc)
        found = None
    if found is not None:
        settings.restore(found.settings)
    plan = recovery.plan(found, mountinfo.read(), config.backing_root,
                         recovery.loop_backing_file)
    for entry in plan.detach:
        log.warning("detaching %s (%s): not a backing mount uenvfs can serve",
                    entry.mount_point, entry.source)
        try:
            await manager.backend.unmount(Path(entry.mount_point), lazy=True)
        except MountError as exc:
            log.error("cannot detach %s: %s", entry.mount_point, exc)
    for adoption in plan.adopt:
        manager.adopt(adoption)
    for name in plan.dropped:
        log.info("%s: in the journal but no longer mounted; dropped", name)
    manager.journal.save()
    log.info("start-up recovery: %s", plan.summary())


async def _signals(manager: Manager, reconfigure: Reconfigure, stop: trio.CancelScope) -> None:
    """Handle signals until the daemon exits: a second SIGTERM must not cut a shutdown short."""
    with trio.open_signal_receiver(*HANDLED_SIGNALS) as received:
        async for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if stop.cancel_called:
                    log.info("%s: already shutting down", signal.Signals(signum).name)
                    continue
                log.info("%s: shutting down", signal.Signals(signum).name)
                stop.cancel()
            elif signum == signal.SIGHUP:
                manager.spawn(_reload_on_signal, reconfigure, task="sighup-reload")
            elif signum == signal.SIGUSR1:
                manager.spawn(_expire_on_signal, manager, task="sigusr1-expire")


async def _reload_on_signal(reconfigure: Reconfigure) -> None:
    try:
        log.info("SIGHUP: reload: %s", await reconfigure.reload())
    except CommandError as exc:
        log.warning("SIGHUP: reload failed: %s", exc)


async def _expire_on_signal(manager: Manager) -> None:
    log.info("SIGUSR1: %s", await manager.expire_idle())


async def run(config: Config, link: Link, resume: Resume | None, handed_socket: int | None,
              reread: Callable[[], Config] | None = None) -> None:
    """Serve until a signal or an external unmount, then shut down cleanly.

    A new connection is mounted here and handed to the keeper; a live one (*resume*) is
    taken over with what its ledger says. The query socket is the one the keeper handed over
    (*handed_socket*), else a new one.
    """
    backend = make_backend(config.backend, config.mount_timeout)
    missing = backend.missing_tools()
    if missing:
        raise StartupError(f"backend {backend.name} needs {', '.join(missing)} (not found in PATH)")
    if config.validate and shutil.which(squashfs.RDSQUASHFS) is None:
        raise StartupError(f"validating images needs {squashfs.RDSQUASHFS} (squashfs-tools-ng), "
                           "not found in PATH; install it or set validate = false")
    catalog = Catalog.from_config(config)
    catalog.refresh()
    handed: dict[str, Any] | None = None
    if resume is not None and resume.standby:
        # Started by `restart`: the tools and sources are checked; the old server stops, then
        # we go on.
        handed = read_handed(await link.wait_go())
    found: ledger_mod.Contents | None = None
    if resume is None:
        lock = lock_state_dir(config.state_dir, os.getppid())  # the keeper's pid
        await clear_stale_mount(config)
    else:
        lock = resume.lock if resume.lock >= 0 else lock_state_dir(config.state_dir,
                                                                    os.getppid())
        try:
            found = read_ledger(resume.ledger, resume.death)
        except ledger_mod.LedgerError as exc:
            raise StartupError(f"cannot resume the connection: its ledger is {exc}; only a "
                               "stop and start (which ends the connection) can go on") from exc
    server = Server(os.getpid(), time.time(), 0 if found is None else found.resumes + 1)

    # The parts, each made with those it uses. The clock is trio's without its lookups on
    # every call (every open and release reads it).
    settings = Settings(config.hold_time)
    prefixes = InodePrefixes()  # image versions (the manager's) and directories (the fs')
    manager = Manager(config, backend, catalog, settings,
                      trio.lowlevel.current_clock().current_time, prefixes=prefixes,
                      metrics=Metrics(server.started))  # process_start_time_seconds
    images = Images(manager, catalog, settings, server)
    reconfigure = Reconfigure(manager, catalog, settings, reread, link.request_restart)
    executor = Executor(manager, manager.counts, images, settings, reconfigure)
    resolver = AllocationResolver(layouts=parse_layouts(config.cgroup_layouts),
                                  owners=manager.owners)
    budget = DescriptorBudget.of_server(config.open_files_per_allocation,
                                        config.open_files_per_uid)
    shares = HandleShares(config.handles_per_uid, config.handles_total,
                          config.allocations_per_uid)
    fs = UenvFS(images, executor, prefixes, resolver, budget, shares, config.mountpoint,
                hold_time=lambda: settings.hold_time, socket_path=config.socket_path)
    manager.listen(fs.listener)

    if found is not None:
        restore_versions(manager, fs, found)
    _prepare_dirs(config, resuming=resume is not None)
    await recover(manager, settings)
    if resume is None:
        try:
            fuse_fd, init = fusedev.mount(config.mountpoint)
        except OSError as exc:
            raise StartupError(f"cannot mount FUSE at {config.mountpoint}: {exc}") from exc
        ledger = SharedLedger.create(init)
        ledger.start()
        link.hold(fuse_fd, ledger.fd, lock)
    else:
        assert found is not None
        fuse_fd, ledger, init = resume.fuse, resume.ledger, found.init
        ledger.resumed(found)
        link.resumed_with(fuse_fd, ledger.fd, lock)
    manager.mounter.attach(ledger)
    fs.attach(ledger)
    query_server = queries.server(config.socket_path, handed_socket, link,
                                  queries.Service(images, resolver))
    if found is not None:
        restore_handles(fs, found, ledger, config.mountpoint)
    if handed is not None:
        handover.apply(manager, settings, handed)
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {"fsname=uenvfs", "subtype=uenvfs", "allow_other"}
    pipe = fusedev.init_pipe(init)
    fs.connect(fuse_fd, pipe)
    try:
        pyfuse3.init(fs, f"/dev/fd/{pipe}", options)
    except RuntimeError as exc:
        raise StartupError(f"cannot start FUSE on {config.mountpoint}: {exc}") from exc
    fs.uses.find_device()  # processes sitting in images are found by the mount's device
    log.info("%s %s (images from %s, backend %s, hold time %g s)",
             "resumed" if resume else "serving", config.mountpoint,
             ", ".join(map(str, catalog.image_dirs)) or "-", backend.name, config.hold_time)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            serving = trio.CancelScope()
            handing_over = trio.Event()
            nursery.start_soon(_signals, manager, reconfigure, serving, name="signals")
            if resume is None:
                nursery.start_soon(_tune_after_init, fs, config, name="readahead")
            nursery.start_soon(fs.uses.run, name="uses")
            nursery.start_soon(link.watch,
                               lambda: nursery.start_soon(_drain, serving, handing_over),
                               functools.partial(_restart_failed, server), name="keeper")
            nursery.start_soon(_ready_after_init, fs, manager, link, resume is not None,
                               name="ready")
            nursery.start_soon(_report, fs, images, link, name="report")
            if query_server is not None:
                nursery.start_soon(query_server.run, name="queries")
            with serving:
                await pyfuse3.main(max_tasks=MAX_REQUESTS)
                if not handing_over.is_set():
                    log.info("%s was unmounted from outside; shutting down", config.mountpoint)
            if handing_over.is_set():
                _hand_over(manager, settings, link)  # does not return
            link.send(STOPPING)
            with contextlib.suppress(OSError):
                config.socket_path.unlink()  # the keeper stops too: no server to ask
            _end_connection(config)
            # Uses through open files die with the connection (the kernel can no longer send
            # their releases); only acquisitions outlive the daemon, through the journal.
            fs.close_all()
            await manager.shutdown()
            resolver.close()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=False)
    os.close(lock)
    log.info("stopped")


async def _drain(serving: trio.CancelScope, handing_over: trio.Event) -> None:
    """The new server is ready to take over: read no more requests, let those under way
    finish (a `.control` command must not be made twice), for `DRAIN` seconds at most; the
    rest the new server gets again (see UenvFS.init)."""
    if handing_over.is_set():
        return
    handing_over.set()
    log.info("handing over to a new server: finishing the requests under way")
    pyfuse3.terminate()
    await trio.sleep(DRAIN)
    log.warning("requests still under way after %g s: the new server answers them", DRAIN)
    serving.cancel()


def _hand_over(manager: Manager, settings: Settings, link: Link) -> NoReturn:
    """Give the new server what only our memory holds, and exit at once (the keeper holds
    the connection, the ledger has every node and handle)."""
    fd = os.memfd_create("uenvfs-handover", os.MFD_CLOEXEC)
    os.write(fd, json.dumps(handover.capture(manager, settings)).encode())
    log.info("handed over; exiting")
    link.send(HANDED, [fd])
    os._exit(0)


def _restart_failed(server: Server, why: str) -> None:
    server.restart_error = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {why}"
    log.error("restart failed: %s; serving on", why)


def _end_connection(config: Config) -> None:
    """Unmount the filesystem: the connection ends once the keeper lets go of it too."""
    try:
        fusedev.unmount(config.mountpoint)
    except OSError as exc:
        log.error("%s", exc)


async def _ready_after_init(fs: UenvFS, manager: Manager, link: Link, resumed: bool) -> None:
    """Once libfuse went through INIT (and requests the last server left unanswered were
    queued again, see UenvFS.init): the keeper (and systemd through it) learns that we serve;
    a resumed server first counts the processes sitting in images, and checks its counts."""
    await fs.initialized.wait()
    if fs.resent is False:
        log.error("this kernel cannot queue again the requests the last server had read "
                  "(FUSE_NOTIFY_RESEND, Linux 6.9): the processes that made them wait forever")
    if resumed:
        await fs.uses.refresh(0.0)  # who sits in images now
    link.ready()
    if resumed:
        # The counts came from the ledger (open handles), the journal (acquisitions) and a
        # scan (working directories): compare them with a full scan, for `.status`.
        # (Processes that open and close files meanwhile may differ for a moment: INFO.)
        outcome = await manager.verify(logging.INFO)
        log.info("resumed counts checked against the processes: %s", outcome)


async def _report(fs: UenvFS, images: Images, link: Link) -> None:
    """Tell the keeper how we serve, every few seconds, once serving: for systemd's STATUS=,
    and as the keeper's proof that this server's loop runs (its watchdog: keeper/loop.py)."""
    interval = float(os.environ.pop(ENV_HEARTBEAT, "") or HEARTBEAT)
    await fs.initialized.wait()
    while True:
        link.send(f"{STATUS} {status_summary(images.status())}")
        await trio.sleep(interval)


def serve(config: Config, reread: Callable[[], Config] | None = None) -> int:
    """A server: started by the keeper (keeper/keeper.py), for a new connection or a live one.
    *reread* reads the configuration again (file and flags), for `reload`."""
    setup_logging(config.log_level)
    try:
        link = Link(int(os.environ.pop(ENV_KEEPER)))
        text = os.environ.pop(ENV_RESUME, None)
        resume = Resume.from_env(text) if text else None
        standby = os.environ.pop(ENV_STANDBY, "")
        died = os.environ.pop(ENV_DIED, None)
        if resume is not None:
            resume.standby = bool(standby)
            resume.death = Death.from_env(died)
        handed_socket = queries.handed_socket(os.environ.pop(ENV_SOCKET, ""))
        with fastloop.installed(linger=config.linger_us / 1e6):  # warns if pyfuse3 is unknown
            trio.run(run, config, link, resume, handed_socket, reread)
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0
