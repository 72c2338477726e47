"""After the last server died for its memory, the next restores less, one step more each time,
and never after a start-up error."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections import Counter

import pytest

from uenvfs.core.ledger import HandleKind
from uenvfs.keeper import servers
from uenvfs.keeper.keeper import Keeper
from uenvfs.keeper.servers import Child
from uenvfs.server.resume import Death, Sparing

NOBODY = 65534
HELD = Counter({(HandleKind.DIR, NOBODY): 100_000, (HandleKind.ROOT_DIR, NOBODY): 10,
                (HandleKind.FILE, 1000): 50, (HandleKind.FILE, 0): 400})


def test_each_death_spares_one_step_more_than_what_is_dead_already() -> None:
    oom = Death(-signal.SIGKILL, True, 1)
    first = Sparing.after(oom, HELD)
    assert (first.snapshots, first.uids) == (True, set())
    assert first.spares(HandleKind.ROOT_DIR, 1000)
    assert not first.spares(HandleKind.DIR, NOBODY)
    # The next server finds the snapshots dead in the ledger: the biggest uid, root's last.
    left = Counter({key: n for key, n in HELD.items() if key[0] != HandleKind.ROOT_DIR})
    second = Sparing.after(oom, left)
    assert (second.snapshots, second.uids) == (False, {NOBODY})
    third = Sparing.after(oom, Counter({(HandleKind.FILE, 1000): 50, (HandleKind.FILE, 0): 400}))
    assert third.uids == {1000}
    assert Sparing.after(oom, Counter({(HandleKind.FILE, 0): 400})).uids == {0}


def test_a_crash_loop_of_unknown_cause_spares_from_the_third_death_and_an_exit_never() -> None:
    killed = [Death(-signal.SIGKILL, False, n) for n in (0, 1, 2)]
    assert not any(Sparing.after(death, HELD) for death in killed)
    assert Sparing.after(Death(-signal.SIGKILL, False, 3), HELD).snapshots
    assert not Sparing.after(Death(1, False, 9), HELD)  # a start-up error: nothing helps
    assert not Sparing.after(None, HELD)


def test_how_a_server_died_comes_from_the_keeper() -> None:
    assert Death.from_env('{"status": -9, "oom": true, "before_serving": 2}') == Death(-9, True,
                                                                                      2)
    assert str(Death(-9, True, 2)) == ("was killed by the OOM killer (2 servers in a row died "
                                       "before they served)")
    assert Death.from_env(None) is None


def test_the_keeper_tells_an_oom_kill_by_its_memory_cgroup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts = iter([3, 4, 4])
    monkeypatch.setattr(servers, "oom_kills", lambda: next(counts))
    ours, theirs = socket.socketpair()
    try:
        keeper = Keeper(["true"])
        child = Child(os.getpid(), -1, ours, oom_kills=next(counts))
        keeper.failed_starts = 1
        assert json.loads(keeper._death(child, -signal.SIGKILL)) == {
            "status": -9, "oom": True, "before_serving": 1}
        # Killed by a signal, no OOM kill since it started: not the OOM killer.
        child.oom_kills = 4
        assert not json.loads(keeper._death(child, -signal.SIGKILL))["oom"]
    finally:
        ours.close()
        theirs.close()
