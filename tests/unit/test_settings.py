"""The operator's settings: set by command, replaced by a reload, kept by the journal (pure)."""

from __future__ import annotations

from uenvfs.core.settings import Settings, SettingsRecord


def test_hold_times_set_by_command_and_replaced_by_a_reload() -> None:
    settings = Settings(60.0)
    assert (settings.hold_time, settings.hold_time_set) == (60.0, None)
    settings.set_hold_time(5.0)
    settings.set_hold_time(900.0, "a")
    assert (settings.hold_time, settings.hold_time_set, settings.hold_times) == (
        5.0, 5.0, {"a": 900.0})
    assert settings.configure(30.0) == 5.0  # the configured one replaces the one set
    assert (settings.hold_time, settings.hold_time_set, settings.configured) == (
        30.0, None, 30.0)
    assert settings.hold_times == {"a": 900.0}  # an image's own stays
    assert settings.configure(20.0) is None


def test_the_journal_keeps_what_was_set_by_command() -> None:
    settings = Settings(60.0)
    assert settings.record() == SettingsRecord()
    settings.set_hold_time(5.0)
    settings.set_hold_time(0.0, "b")
    settings.emergency = True
    settings.verify = {"at": "2026-01-01T00:00:00Z", "differences": []}  # not journaled
    assert settings.record() == SettingsRecord(5.0, 60.0, {"b": 0.0}, True)


def test_restore_takes_back_what_the_journal_kept() -> None:
    settings = Settings(60.0)
    settings.restore(SettingsRecord(5.0, 60.0, {"b": 0.0}, True))
    assert (settings.hold_time, settings.hold_time_set) == (5.0, 5.0)
    assert (settings.hold_times, settings.emergency) == ({"b": 0.0}, True)
    assert settings.record() == SettingsRecord(5.0, 60.0, {"b": 0.0}, True)


def test_a_changed_configuration_wins_over_a_hold_time_set_before() -> None:
    settings = Settings(9.0)
    settings.restore(SettingsRecord(5.0, 60.0))  # set when 60 s was configured
    assert (settings.hold_time, settings.hold_time_set) == (9.0, None)
    settings.restore(SettingsRecord(7.0))  # no configured one known: taken
    assert (settings.hold_time, settings.hold_time_set) == (7.0, 7.0)


def test_an_older_servers_hold_time_lasts_until_a_reload() -> None:
    settings = Settings(60.0)
    settings.carry_over(5.0)
    assert (settings.hold_time, settings.record()) == (5.0, SettingsRecord())
    settings.configure(30.0)
    assert settings.hold_time == 30.0
