"""What a server hands the next one at a planned restart, beyond the ledger and the journal.

The ledger (core/ledger.py) has every node and handle, so the counts of open handles come back
exactly; the journal and the mount table have the mounts and the acquisitions. This adds what
only the old server's memory held: the settings whole (core/settings.py: the global and
per-image hold times, emergency mode, the last verification), the running hold timers (as
time left), failed images with their error and retry time, the processes sitting in images,
the mount namespaces holding them and the trees handed out still in their grace time. Times
are carried as seconds left, so the deadlines stay where they were.

    {"config": {...the configuration in force...},
     "hold_time": 60.0, "hold_time_set": null, "emergency": false, "verify": null,
     "images": {"x": {"hold_time": 5.0, "phase": "holding", "hold_left": 3.2,
                      "error": null, "retry_in": 0.0, "acquired": ["job-1"],
                      "cwd": {"job-2": 1}, "namespaces": {"job-3": 1},
                      "handed": {"job-3": 4.5}}}}
"""

from __future__ import annotations

import logging
from typing import Any

from ..core import config as config_mod
from ..core.settings import Settings
from ..core.state import Image, Phase, Scanned
from ..manager.manager import Manager

log = logging.getLogger(__name__)


def capture(manager: Manager, settings: Settings) -> dict[str, Any]:
    """The state to hand over, as of now: the *settings* whole, and each image's state."""
    registry = manager.registry
    now = manager.clock()
    images = {}
    # An image with its own hold time that was never used has no state: it goes as unmounted.
    for name in sorted(registry.images.keys() | settings.hold_times.keys()):
        image = registry.images.get(name) or Image(name)
        deadline = registry.deadline(image)
        images[name] = {
            "hold_time": settings.hold_times.get(name),
            "phase": image.phase.value,
            "hold_left": None if deadline is None else max(0.0, deadline - now),
            "error": image.error,
            "retry_in": max(0.0, image.retry_at - now),
            "acquired": sorted(a for a, u in image.users.items() if u.acquired),
            "cwd": {a: u.cwd for a, u in image.users.items() if u.cwd},
            "namespaces": {a: u.namespaces for a, u in image.users.items() if u.namespaces},
            "handed": {a: u.handed_until - now for a, u in image.users.items()
                       if u.handed_until > now},
        }
    return {"config": config_mod.as_json(manager.config),
            "hold_time": settings.hold_time, "hold_time_set": settings.hold_time_set,
            "emergency": settings.emergency, "verify": settings.verify, "images": images}


def apply(manager: Manager, settings: Settings, document: dict[str, Any]) -> None:
    """Carry on from *document* (see `capture`): after recovery adopted the mounts and the
    ledger's handles were counted again."""
    registry = manager.registry
    now = manager.clock()
    _log_config(document.get("config"), manager)
    if "hold_time_set" not in document:  # an older server's, which journaled no hold time
        settings.carry_over(float(document["hold_time"]))
    # else: the journal had it (Settings.restore), and the configuration may have changed it
    # since, as a reload would
    settings.emergency = bool(document["emergency"])
    settings.verify = document.get("verify")
    for name, was in document["images"].items():
        if was["hold_time"] is None:
            settings.hold_times.pop(name, None)
        else:
            settings.hold_times[name] = was["hold_time"]
        image = registry[name]
        if image.is_mounted:
            for alloc in was["acquired"]:
                image.acquire(alloc, now)
            for alloc, left in was.get("handed", {}).items():  # none from an older server
                image.handed(alloc, now, left)
            namespaces = was.get("namespaces", {})
            image.scanned({alloc: Scanned(was["cwd"].get(alloc, 0), namespaces.get(alloc, 0))
                           for alloc in was["cwd"].keys() | namespaces.keys()}, now)
            if image.phase is Phase.HOLDING and was["hold_left"] is not None:
                image.held_before(now, registry.hold_time_of(image) - was["hold_left"])
        elif image.phase is Phase.UNMOUNTED and was["phase"] == Phase.FAILED.value:
            image.failed_before(now, was["error"] or "failed", was["retry_in"])
    manager.hold_times_changed()


def _log_config(old: Any, manager: Manager) -> None:
    """Say what the new server's configuration changed (a restart applies the file)."""
    if not isinstance(old, dict):
        return
    found = config_mod.changes(old, config_mod.as_json(manager.config))
    if found.live or found.restart:
        log.info("restart: configuration now in force: %s", "; ".join(found.live + found.restart))
    if found.connection:
        # `restart` refuses them; the file changed again since it was checked
        log.warning("restart: configuration changes that take a stop and start of uenvfs "
                    "(this connection was made without them: stop and start it): %s",
                    "; ".join(found.connection))
