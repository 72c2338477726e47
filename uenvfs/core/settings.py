"""The operator's settings of a server: the hold times and emergency mode, and the last
verification of the counts.

One `Settings` value holds them all. The daemon makes it and hands it to the parts that use
it: the state machine reads the hold times (state.py), `.control` commands change them
(manager/executor.py), a reload applies the configured hold time (manager/reconfigure.py),
the journal keeps what was set by command (`record`, `restore`; manager/journal.py) and a
planned restart hands the whole value over (server/handover.py).

Pure: no trio, no pyfuse3.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingsRecord:
    """The settings as the journal keeps them: those made by command."""

    hold_time: float | None = None  # set by `hold-time SECONDS`; None: the configured one
    hold_time_configured: float | None = None  # the configured one when that was set
    hold_times: Mapping[str, float] = field(default_factory=dict)  # `hold-time SECONDS NAME`
    emergency: bool = False


class Settings:
    """The hold times, emergency mode and last verification in force in this server.

    Invariants: `hold_time` (the global hold time in force) is `hold_time_set` if that is not
    None, else `configured` (or, until the next reload, the one an older server handed over:
    see `carry_over`); `configured` is the configuration's hold time. A name in `hold_times`
    has its own hold time, whatever the global one.
    """

    def __init__(self, configured: float) -> None:
        self.configured = configured
        self.hold_time = configured
        self.hold_time_set: float | None = None  # by `hold-time SECONDS` (journaled)
        self.hold_times: dict[str, float] = {}  # by `hold-time SECONDS NAME` (journaled)
        self.emergency = False  # force-unmount is allowed (journaled)
        self.verify: dict[str, Any] | None = None  # the last `verify`: when, what differed

    def set_hold_time(self, seconds: float, name: str | None = None) -> None:
        """`hold-time SECONDS [NAME]`: the global hold time, or *name*'s own."""
        if name is None:
            self.hold_time = self.hold_time_set = seconds
        else:
            self.hold_times[name] = seconds

    def configure(self, configured: float) -> float | None:
        """The configuration's hold time changed (a reload): it is in force from now on,
        in place of one set by command, which is returned (None if none was)."""
        replaced = self.hold_time_set
        self.configured = self.hold_time = configured
        self.hold_time_set = None
        return replaced

    def carry_over(self, hold_time: float) -> None:
        """An older server, which journaled no hold time, handed over the one in force: it
        stays in force, unjournaled, until a reload or the next start applies the
        configured one."""
        self.hold_time = hold_time

    def record(self) -> SettingsRecord:
        """What the journal keeps of the settings."""
        configured = None if self.hold_time_set is None else self.configured
        return SettingsRecord(self.hold_time_set, configured, dict(self.hold_times),
                              self.emergency)

    def restore(self, record: SettingsRecord) -> None:
        """Take back what the journal kept before a restart (see `record`). A global hold
        time set by command gives way to the configured one if the configuration changed
        it since, as at a reload."""
        configured = self.configured
        if record.hold_time is not None and record.hold_time_configured not in (None,
                                                                               configured):
            log.info("hold time %g s, as configured now (hold-time had set %g s when %g s was "
                     "configured)", configured, record.hold_time, record.hold_time_configured)
        elif record.hold_time is not None:
            self.hold_time = self.hold_time_set = record.hold_time
            log.info("hold time %g s, as set by hold-time before the restart (configured: %g s)",
                     record.hold_time, configured)
        self.hold_times.update(record.hold_times)
        if record.hold_times:
            log.info("hold times of single images, as set before the restart: %s",
                     ", ".join(f"{n} {s:g} s" for n, s in sorted(record.hold_times.items())))
        if record.emergency:
            self.emergency = True
            log.warning("emergency mode ON, as before the restart: force-unmount is allowed")
