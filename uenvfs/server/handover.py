"""What a server hands the next one at a planned restart, beyond the ledger and the journal.

The ledger (ledger.py) has every node and handle, so the counts of open handles come back
exactly; the journal and the mount table have the mounts and the acquisitions. This adds what
only the old server's memory held: the global and per-image hold times, emergency mode, the
running hold timers (as time left), failed images with their error and retry time, the
processes sitting in images, and the last verification. Times are carried as seconds left, so
the deadlines stay where they were.

    {"hold_time": 60.0, "hold_time_set": null, "emergency": false, "verify": null,
     "images": {"x": {"hold_time": 5.0, "phase": "holding", "hold_left": 3.2,
                      "error": null, "retry_in": 0.0, "acquired": ["job-1"],
                      "cwd": {"job-2": 1}}}}
"""

from __future__ import annotations

import logging
from typing import Any

from ..core import config as config_mod
from ..core.state import Phase
from ..manager.manager import Manager

log = logging.getLogger(__name__)


def capture(manager: Manager) -> dict[str, Any]:
    """The state to hand over, as of now."""
    registry = manager.registry
    now = manager.clock()
    images = {}
    for image in registry:
        deadline = registry.deadline(image)
        images[image.name] = {
            "hold_time": image.hold_time,
            "phase": image.phase.value,
            "hold_left": None if deadline is None else max(0.0, deadline - now),
            "error": image.error,
            "retry_in": max(0.0, image.retry_at - now),
            "acquired": sorted(a for a, u in image.users.items() if u.acquired),
            "cwd": {a: u.cwd for a, u in image.users.items() if u.cwd},
        }
    return {"config": config_mod.as_json(manager.config),
            "hold_time": registry.hold_time, "hold_time_set": manager.hold_time_set,
            "emergency": manager.executor.emergency,
            "verify": manager.last_verify, "images": images}


def apply(manager: Manager, document: dict[str, Any]) -> None:
    """Carry on from *document* (see `capture`): after recovery adopted the mounts and the
    ledger's handles were counted again."""
    registry = manager.registry
    now = manager.clock()
    _log_config(document.get("config"), manager)
    if "hold_time_set" not in document:  # an older server's, which journaled no hold time
        registry.hold_time = float(document["hold_time"])
    # else: the journal had it (Manager.restore_settings), and the configuration may have
    # changed it since, as a reload would
    manager.executor.emergency = bool(document["emergency"])
    manager.last_verify = document.get("verify")
    for name, was in document["images"].items():
        image = registry[name]
        image.hold_time = was["hold_time"]
        if image.is_mounted:
            for alloc in was["acquired"]:
                image.acquire(alloc, now)
            image.sitting(was["cwd"], now)
            if image.phase is Phase.HOLDING and was["hold_left"] is not None:
                image.idle_since = now - (registry.hold_time_of(image) - was["hold_left"])
        elif image.phase is Phase.UNMOUNTED and was["phase"] == Phase.FAILED.value:
            image.failed_before(now, was["error"] or "failed", was["retry_in"])
    manager.timer.wake()


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
