"""Wiring of `uenvfs serve`: start-up, the trio nursery, signals, and shutdown.

Start-up clears a FUSE mount left by a killed daemon, mounts the filesystem (it is ready from
then on), and serves until SIGTERM/SIGINT or an external unmount. SIGHUP re-reads the image
sources, SIGUSR1 expires idle mounts. Shutdown unmounts the FUSE filesystem and every idle
backing mount; a mount still in use stays for the next daemon to adopt.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import socket
import stat
from pathlib import Path

import pyfuse3
import trio

from . import fastloop, journal, recovery, squashfs
from .allocation import AllocationResolver
from .backend import make_backend, mount_at, read_mountinfo
from .catalog import Catalog
from .config import Config
from .descriptors import RESERVE, DescriptorBudget
from .errors import CommandError, MountError, StartupError
from .fs import UenvFS
from .inodes import InodePrefixes
from .manager import Manager
from .ownership import clear_stale_mount, lock_state_dir

log = logging.getLogger(__name__)

# Requests answered at once. pyfuse3's default, 99, let 120 processes waiting for one image's
# first mount stall every other image; each waiting request costs a task and a receive buffer
# (1 MiB of address space, of which it touches only what the request needs).
MAX_REQUESTS = 1000
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _raise_fd_limit() -> None:
    """Every open file in every image holds one backing fd: allow as many as the system does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, if it asked."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)


def _tune_readahead(config: Config) -> None:
    """Let the kernel read ahead `read_ahead_kb` through our mount (its default is 128 KiB).

    Each FUSE read costs a round trip and two copies: with 1 MiB windows a cold 1 GiB file
    takes 1,024 reads instead of 8,192 (measured 3.3 s -> 2.0 s here, the kernel's own squashfs
    mount 1.0 s). Found through mountinfo: the daemon must not stat its own mountpoint.
    """
    if not config.read_ahead_kb:
        return
    entry = mount_at(config.mountpoint)
    if entry is None or entry.device is None:
        return
    knob = Path("/sys/class/bdi") / entry.device / "read_ahead_kb"
    try:
        knob.write_text(str(config.read_ahead_kb))
    except OSError as exc:
        log.warning("cannot set %s: %s", knob, exc.strerror)


async def _tune_after_init(fs: UenvFS, config: Config) -> None:
    # The kernel sets the mount's readahead when it gets the INIT reply: change it after.
    await fs.initialized.wait()
    await trio.lowlevel.checkpoint()
    _tune_readahead(config)


def _prepare_dirs(config: Config) -> None:
    for directory in (config.state_dir, config.backing_root, config.mountpoint):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create {directory}: {exc.strerror}") from exc
        if not stat.S_ISDIR(directory.stat().st_mode):
            raise StartupError(f"{directory} is not a directory")


async def recover(manager: Manager) -> None:
    """Rebuild the state from the kernel's mount table and the journal (the contract's WI6)."""
    config = manager.config
    try:
        found = journal.load(config.journal_path)
    except journal.JournalError as exc:
        log.warning("journal %s unreadable (%s): recovering from the mount table alone",
                    config.journal_path, exc)
        found = None
    plan = recovery.plan(found, read_mountinfo(), config.backing_root,
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


async def _signals(manager: Manager, stop: trio.CancelScope) -> None:
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
                manager.spawn(_reload_on_signal, manager, task="sighup-reload")
            elif signum == signal.SIGUSR1:
                manager.spawn(_expire_on_signal, manager, task="sigusr1-expire")


async def _reload_on_signal(manager: Manager) -> None:
    try:
        log.info("SIGHUP: reload: %s", await manager.reload())
    except CommandError as exc:
        log.warning("SIGHUP: reload failed: %s", exc)


async def _expire_on_signal(manager: Manager) -> None:
    log.info("SIGUSR1: %s", await manager.expire_idle())


async def run(config: Config) -> None:
    """Serve until a signal or an external unmount, then shut down cleanly."""
    backend = make_backend(config.backend, config.mount_timeout)
    missing = backend.missing_tools()
    if missing:
        raise StartupError(f"backend {backend.name} needs {', '.join(missing)} (not found in PATH)")
    if config.validate and shutil.which(squashfs.RDSQUASHFS) is None:
        raise StartupError(f"validating images needs {squashfs.RDSQUASHFS} (squashfs-tools-ng), "
                           "not found in PATH; install it or set validate = false")
    catalog = Catalog(config.images, config.maps, config.program_map, config.program_timeout,
                      answer_ttl=config.negative_cache, source_timeout=config.mount_timeout)
    catalog.refresh()
    prefixes = InodePrefixes()  # image versions (the manager's) and directories (the fs')
    manager = Manager(config, backend, catalog, prefixes=prefixes)
    resolver = AllocationResolver()
    _raise_fd_limit()
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    budget = DescriptorBudget(limit, config.open_files_per_allocation)
    log.info("open files: %d per allocation, %d in all (descriptor limit %d)",
             budget.per_allocation, limit - RESERVE, limit)
    fs = UenvFS(manager, prefixes, resolver, budget, config.mountpoint)
    fs.uses.hold_time = lambda: manager.registry.hold_time
    manager.listener = fs.listener

    lock = lock_state_dir(config.state_dir)  # held until the process exits
    await clear_stale_mount(config)
    _prepare_dirs(config)
    await recover(manager)
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {"fsname=uenvfs", "subtype=uenvfs", "allow_other"}
    try:
        pyfuse3.init(fs, str(config.mountpoint), options)
    except RuntimeError as exc:
        raise StartupError(f"cannot mount FUSE at {config.mountpoint}: {exc}") from exc
    fs.uses.find_device()  # processes sitting in images are found by the mount's device
    log.info("serving %s (images from %s, backend %s, hold time %g s)", config.mountpoint,
             ", ".join(map(str, catalog.image_dirs)) or "-", backend.name, config.hold_time)
    fuse_open = True
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            serving = trio.CancelScope()
            nursery.start_soon(_signals, manager, serving, name="signals")
            nursery.start_soon(_tune_after_init, fs, config, name="readahead")
            nursery.start_soon(fs.uses.run, name="uses")
            with serving:
                _sd_notify("READY=1")
                await pyfuse3.main(max_tasks=MAX_REQUESTS)
                log.info("%s was unmounted from outside; shutting down", config.mountpoint)
            _sd_notify("STOPPING=1")
            pyfuse3.close(unmount=True)
            fuse_open = False
            # Uses through open files die with the connection (the kernel can no longer send
            # their releases); only acquisitions outlive the daemon, through the journal.
            fs.close_all()
            await manager.shutdown()
            resolver.close()
            nursery.cancel_scope.cancel()
    finally:
        if fuse_open:
            pyfuse3.close(unmount=True)
    os.close(lock)
    log.info("stopped")


def serve(config: Config) -> int:
    setup_logging(config.log_level)
    try:
        with fastloop.installed(linger=config.linger_us / 1e6):  # warns if pyfuse3 is unknown
            trio.run(run, config)
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0
