"""The pure refcount and lifecycle machine, without a mount: rules, errors and invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from uenvfs.core.errors import RefcountInconsistency
from uenvfs.core.registry import Registry
from uenvfs.core.settings import Settings
from uenvfs.core.state import (
    FORCE_UNMOUNTED,
    GRACE,
    IllegalTransition,
    Image,
    Phase,
    Scanned,
    Use,
)

HOLD = 60.0


def mounted_image(now: float = 0.0) -> Image:
    image = Image("img")
    image.begin_mount(now)
    image.mounted(now)
    return image


def test_new_mount_holds_until_used() -> None:
    image = mounted_image(10.0)
    assert image.phase is Phase.HOLDING
    assert image.refcount == 0
    assert not image.due(69.9, HOLD)
    assert image.due(70.0, HOLD)


def test_refcount_counts_allocations_not_opens() -> None:
    image = mounted_image()
    a1 = image.open("alloc-a", 1)
    a2 = image.open("alloc-a", 2)
    b1 = image.open("alloc-b", 3)
    assert a1 is a2
    assert image.refcount == 2
    assert image.users["alloc-a"].opens == 2
    assert image.phase is Phase.MOUNTED
    assert image.idle_since is None
    assert image.close(a1, 4)
    assert image.refcount == 2
    assert image.close(a2, 5)
    assert image.refcount == 1
    assert image.close(b1, 6)
    assert image.refcount == 0
    assert image.phase is Phase.HOLDING
    assert image.idle_since == 6


def test_acquire_and_release() -> None:
    image = mounted_image()
    assert image.acquire("slurm-7", 1)
    assert not image.acquire("slurm-7", 2)  # idempotent
    use = image.open("slurm-7", 3)
    assert image.refcount == 1
    assert image.close(use, 4)
    assert image.refcount == 1  # still acquired
    assert image.release("slurm-7", 5)
    assert image.refcount == 0
    assert not image.release("slurm-7", 6)


def test_release_forgets_open_handles_so_late_close_is_a_no_op() -> None:
    image = mounted_image()
    use = image.open("alloc-a", 1)
    image.open("alloc-a", 1)
    assert image.release("alloc-a", 2)
    assert image.refcount == 0
    assert not image.close(use, 3)  # forgotten: no decrement, no error
    again = image.open("alloc-a", 4)  # a new use, not the old one
    assert again is not use
    assert not image.close(use, 5)
    assert image.refcount == 1


def test_transfer_moves_one_open_to_another_allocation() -> None:
    image = mounted_image()
    exe = image.open("uid-0", 1)
    moved = image.transfer(exe, "alloc-9", 2)
    assert moved is not None
    assert set(image.users) == {"alloc-9"}
    assert image.phase is Phase.MOUNTED  # never idle in between
    assert image.transfer(exe, "alloc-10", 3) is None  # the old use is gone
    assert image.close(moved, 4)
    assert image.refcount == 0


def test_negative_refcount_raises() -> None:
    image = mounted_image()
    use = image.open("alloc-a", 1)
    image.open("alloc-b", 1)
    use.opens = 0  # corrupt it, as a double close would
    image.users["alloc-a"] = use
    with pytest.raises(RefcountInconsistency):
        image.close(use, 2)
    assert use.opens == 0


def test_expire_only_when_idle_and_due_unless_forced() -> None:
    image = mounted_image(0)
    use = image.open("a", 1)
    assert not image.expire(1000, HOLD, force=True)  # in use: even `expire` leaves it
    image.close(use, 10)
    assert not image.expire(69, HOLD)
    assert image.expire(70, HOLD)
    assert image.phase is Phase.UNMOUNTING
    image.unmounted(71)
    assert image.phase is Phase.UNMOUNTED


def test_uses_need_a_mount() -> None:
    image = Image("img")
    with pytest.raises(IllegalTransition):
        image.open("a", 0)
    with pytest.raises(IllegalTransition):
        image.mounted(0)
    image.begin_mount(0)
    with pytest.raises(IllegalTransition):
        image.begin_mount(0)
    with pytest.raises(IllegalTransition):
        image.acquire("a", 0)


def test_failed_mount_is_negatively_cached() -> None:
    image = Image("img")
    image.begin_mount(0)
    image.mount_failed(0, "bad magic", retry_after=10)
    assert image.phase is Phase.FAILED
    assert image.error == "bad magic"
    assert not image.may_mount(9.9)
    assert image.may_mount(10)
    image.begin_mount(10)
    assert image.error is None


def test_force_unmount_drops_users_and_marks_failed() -> None:
    image = mounted_image()
    use = image.open("a", 1)
    image.acquire("b", 1)
    assert sorted(image.force_unmount(2)) == ["a", "b"]
    assert image.refcount == 0
    image.unmounted(3)
    assert image.phase is Phase.FAILED
    assert image.error == FORCE_UNMOUNTED
    assert image.may_mount(3)  # "until it is next used": no negative cache
    assert not image.close(use, 4)


def test_unmount_failure_holds_again() -> None:
    image = mounted_image()
    assert image.expire(100, HOLD)
    image.unmount_failed(101, "busy")
    assert image.phase is Phase.HOLDING
    assert image.idle_since == 101
    assert image.error == "busy"


def test_a_hold_timer_handed_over_runs_on() -> None:
    image = mounted_image()  # HOLDING since 0
    image.held_before(100.0, 40.0)  # the server before held it idle for 40 s
    assert image.idle_since == 60.0
    assert not image.due(119.0, HOLD)
    assert image.due(120.0, HOLD)
    image.open("alloc-1", 101)
    with pytest.raises(IllegalTransition):
        image.held_before(102.0, 1.0)  # in use: no timer runs


def test_registry_deadlines_follow_hold_time_changes() -> None:
    registry = Registry(Settings(60))
    a, b = registry["a"], registry["b"]
    for image, t in ((a, 0.0), (b, 5.0)):
        image.begin_mount(t)
        image.mounted(t)
    assert registry.next_deadline() == 60
    registry.settings.set_hold_time(1, "b")
    assert registry.next_deadline() == 6
    assert [i.name for i in registry.due(6)] == ["b"]
    registry.settings.set_hold_time(2)
    assert [i.name for i in registry.due(6)] == ["a", "b"]


def test_registry_release_and_reconcile() -> None:
    registry = Registry(Settings(60))
    for name in ("x", "y"):
        registry[name].begin_mount(0)
        registry[name].mounted(0)
    registry["x"].acquire("a1", 1)
    registry["y"].acquire("a1", 1)
    registry["y"].open("a2", 1)
    registry["x"].open("a3", 1)
    assert registry.release("a1", 2, ["x"]) == ["x"]
    assert registry.allocations() == {"a1", "a2", "a3"}
    dropped = registry.reconcile(["a2"], 3)
    assert sorted(dropped) == [("x", "a3"), ("y", "a1")]
    assert registry.allocations() == {"a2"}
    registry.check()


# -- any sequence of events keeps the contract ---------------------------------------------

ALLOCS = st.sampled_from(["alloc-1", "alloc-2", "slurm-3", "uid-0"])


class ImageMachine(RuleBasedStateMachine):
    """Random opens, closes, acquires, releases, reconciles, scans of processes sitting in the
    image and of namespaces holding it, trees handed out, timer expiries and remounts.

    A model counts independently: a handle counts while its allocation has not been released
    since the handle opened (a per-allocation generation), so the refcount must equal the
    number of allocations with a counting handle, an acquire, or what the last scan found (a
    tree handed out counting as a namespace until its grace time is over).
    """

    @initialize()
    def setup(self) -> None:
        self.image = Image("img")
        self.now = 0.0
        self.hold = 5.0
        self.handles: list[tuple[Use, str, int]] = []
        self.generation: dict[str, int] = {}
        self.acquired: set[str] = set()
        self.scanned: dict[str, tuple[int, int]] = {}  # the last scan's (cwd, namespaces)
        self.handed: dict[str, float] = {}  # a tree handed out counts until then

    def gen(self, alloc: str) -> int:
        return self.generation.get(alloc, 0)

    def forget(self, alloc: str) -> None:
        self.generation[alloc] = self.gen(alloc) + 1
        self.acquired.discard(alloc)
        self.scanned.pop(alloc, None)
        self.handed.pop(alloc, None)

    @rule(dt=st.floats(min_value=0, max_value=10))
    def tick(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.image.may_mount(self.now))
    @rule(ok=st.booleans())
    def mount(self, ok: bool) -> None:
        self.image.begin_mount(self.now)
        if ok:
            self.image.mounted(self.now)
        else:
            self.image.mount_failed(self.now, "corrupt", 1.0)

    @precondition(lambda self: self.image.is_mounted)
    @rule(alloc=ALLOCS)
    def open(self, alloc: str) -> None:
        self.handles.append((self.image.open(alloc, self.now), alloc, self.gen(alloc)))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.handles) - 1))
        use, alloc, gen = self.handles.pop(index)
        counted = self.image.close(use, self.now)
        assert counted == (gen == self.gen(alloc))

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), alloc=ALLOCS)
    def transfer(self, data: st.DataObject, alloc: str) -> None:
        index = data.draw(st.integers(0, len(self.handles) - 1))
        use, old, gen = self.handles[index]
        moved = self.image.transfer(use, alloc, self.now)
        counting = gen == self.gen(old)
        assert (moved is not None) == (counting and old != alloc)
        if moved is not None:
            self.handles[index] = (moved, alloc, self.gen(alloc))

    @rule(found=st.dictionaries(ALLOCS, st.tuples(st.integers(0, 2), st.integers(0, 2))))
    def scan(self, found: dict[str, tuple[int, int]]) -> None:
        self.image.scanned({a: Scanned(*seen) for a, seen in found.items()}, self.now)
        self.scanned = {}
        if not self.image.is_mounted:
            return
        for alloc in found.keys() | self.handed.keys():
            cwd, namespaces = found.get(alloc, (0, 0))
            if self.now < self.handed.get(alloc, -math.inf):
                namespaces = max(namespaces, 1)
            if cwd or namespaces:
                self.scanned[alloc] = (cwd, namespaces)

    @precondition(lambda self: self.image.is_mounted)
    @rule(alloc=ALLOCS)
    def hand(self, alloc: str) -> None:
        self.image.handed(alloc, self.now)
        self.handed[alloc] = max(self.handed.get(alloc, -math.inf), self.now + GRACE)
        cwd, namespaces = self.scanned.get(alloc, (0, 0))
        self.scanned[alloc] = (cwd, max(namespaces, 1))

    @precondition(lambda self: self.image.is_mounted)
    @rule(alloc=ALLOCS)
    def acquire(self, alloc: str) -> None:
        self.image.acquire(alloc, self.now)
        self.acquired.add(alloc)

    @rule(alloc=ALLOCS)
    def release(self, alloc: str) -> None:
        self.image.release(alloc, self.now)
        self.forget(alloc)

    @rule(live=st.sets(ALLOCS))
    def reconcile(self, live: set[str]) -> None:
        registry = Registry(Settings(self.hold))
        registry.images["img"] = self.image
        registry.reconcile(live, self.now)
        for alloc in {"alloc-1", "alloc-2", "slurm-3", "uid-0"} - live:
            self.forget(alloc)

    @rule(force=st.booleans())
    def timer_or_expire(self, force: bool) -> None:
        if self.image.expire(self.now, self.hold, force=force):
            self.image.unmounted(self.now)

    @precondition(lambda self: self.image.is_mounted)
    @rule()
    def force_unmount(self) -> None:
        for alloc in self.image.force_unmount(self.now):
            self.forget(alloc)
        self.image.unmounted(self.now)

    @invariant()
    def refcount_is_exact(self) -> None:
        if not hasattr(self, "image"):
            return
        counting = {alloc for _, alloc, gen in self.handles if gen == self.gen(alloc)}
        users = {a for a in counting | self.acquired | set(self.scanned)
                 if self.image.is_mounted}
        assert self.image.refcount == len(users) >= 0
        assert set(self.image.users) == users
        assert {a: (u.cwd, u.namespaces) for a, u in self.image.users.items()
                if u.cwd or u.namespaces} == self.scanned
        assert all(u.opens >= 0 for u in self.image.users.values())
        self.image.check()

    @invariant()
    def a_tree_in_its_grace_time_is_a_use(self) -> None:
        if not hasattr(self, "image"):
            return
        for alloc, until in self.handed.items():
            if self.now < until:
                assert self.image.users[alloc].namespaces >= 1

    @invariant()
    def timer_runs_exactly_when_idle_and_mounted(self) -> None:
        if not hasattr(self, "image"):
            return
        idle_mounted = self.image.is_mounted and self.image.refcount == 0
        assert (self.image.idle_since is not None) == idle_mounted


ImageMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60,
                                          deadline=None)
TestImageMachine = ImageMachine.TestCase


def sitting(found: dict[str, dict[str, int]]) -> dict[str, dict[str, Scanned]]:
    """A scan that found processes sitting in images (image -> allocation -> how many)."""
    return {image: {alloc: Scanned(cwd=n) for alloc, n in allocs.items()}
            for image, allocs in found.items()}


def test_processes_sitting_in_an_image_are_uses_of_their_allocations() -> None:
    registry = Registry(Settings(60.0))
    image = registry["img"]
    image.begin_mount(0)
    image.mounted(1)
    # A scan finds two processes of job-7 in the image: used, the hold timer stops.
    assert registry.scanned(sitting({"img": {"job-7": 2}}), 2) == [image]
    assert (image.phase, image.refcount, image.users["job-7"].cwd) == (Phase.MOUNTED, 1, 2)
    image.check()
    assert registry.scanned(sitting({"img": {"job-7": 2}}), 3) == []  # nothing changed
    # An open of the same allocation adds to the same use; leaving keeps the open.
    use = image.open("job-7", 4)
    assert registry.scanned({}, 5) == [image]
    assert (image.refcount, use.cwd, use.opens) == (1, 0, 1)
    image.close(use, 6)
    assert (image.phase, image.idle_since) == (Phase.HOLDING, 6)
    # A release forgets the processes too, until a scan finds them again.
    registry.scanned(sitting({"img": {"job-8": 1}}), 7)
    assert image.release("job-8", 8)
    assert (image.phase, image.refcount) == (Phase.HOLDING, 0)
    assert registry.scanned(sitting({"img": {"job-8": 1}}), 9) == [image]
    image.check()
    # An image that is not mounted does not count them.
    other = registry["other"]
    assert registry.scanned(sitting({"img": {"job-8": 1}, "other": {"job-8": 1}}), 10) == []
    assert other.refcount == 0
    # Nor does one being unmounted by force.
    assert image.force_unmount(11) == ["job-8"]
    assert registry.scanned(sitting({"img": {"job-8": 1}}), 12) == []


def test_namespaces_holding_an_image_are_uses_of_their_allocations() -> None:
    registry = Registry(Settings(60.0))
    image = registry["img"]
    image.begin_mount(0)
    image.mounted(1)
    # Two namespaces of job-7 hold a mount of the image, none of its processes in it.
    assert registry.scanned({"img": {"job-7": Scanned(namespaces=2)}}, 2) == [image]
    use = image.users["job-7"]
    assert (image.phase, use.namespaces, use.cwd, use.opens) == (Phase.MOUNTED, 2, 0, 0)
    image.check()
    # One of its processes goes in as well: one scan sets both, the same use.
    assert registry.scanned({"img": {"job-7": Scanned(1, 1)}}, 3) == [image]
    assert image.users["job-7"] is use
    assert (use.cwd, use.namespaces) == (1, 1)
    # Its processes sit elsewhere while the namespace holds it: still a use, no timer.
    assert registry.scanned({"img": {"job-7": Scanned(0, 1)}}, 4) == [image]
    assert (image.phase, image.idle_since) == (Phase.MOUNTED, None)
    # The namespace's last process is gone: idle, the hold timer starts then.
    assert registry.scanned({}, 5) == [image]
    assert (image.phase, image.idle_since, image.refcount) == (Phase.HOLDING, 5, 0)
    # A release forgets them, until a scan finds them again.
    registry.scanned({"img": {"job-8": Scanned(namespaces=1)}}, 6)
    assert image.release("job-8", 7)
    assert image.refcount == 0
    assert registry.scanned({"img": {"job-8": Scanned(namespaces=1)}}, 8) == [image]
    # Expire leaves it (a use); a force-unmount drops it, and no scan counts it after.
    assert not image.expire(9, 60.0, force=True)
    assert image.force_unmount(10) == ["job-8"]
    assert registry.scanned({"img": {"job-8": Scanned(namespaces=1)}}, 11) == []


def test_without_the_fuse_connection_only_namespaces_hold_images() -> None:
    registry = Registry(Settings(60.0))
    for name in ("sat", "held", "both"):
        registry[name].begin_mount(0)
        registry[name].mounted(0)
    registry.scanned({"sat": {"job-1": Scanned(cwd=1)}, "held": {"job-2": Scanned(0, 2)},
                      "both": {"job-3": Scanned(1, 1)}}, 1)
    registry["held"].handed("job-4", 1)
    assert sorted(i.name for i in registry.disconnected(2)) == ["both", "sat"]
    assert (registry["sat"].phase, registry["sat"].idle_since) == (Phase.HOLDING, 2)
    assert {a: (u.cwd, u.namespaces) for a, u in registry["held"].users.items()} == {
        "job-2": (0, 2), "job-4": (0, 1)}
    assert {a: (u.cwd, u.namespaces) for a, u in registry["both"].users.items()} == {
        "job-3": (0, 1)}
    registry.check()


def test_a_tree_handed_out_is_a_namespace_use_for_its_grace_time() -> None:
    image = mounted_image(0.0)
    # Handed out at 10: one namespace of job-7 at once, the hold timer stopped.
    use = image.handed("job-7", 10.0)
    assert (image.phase, image.refcount, use.namespaces) == (Phase.MOUNTED, 1, 1)
    # Not attached yet: a scan within the grace time keeps it.
    assert not image.scanned({}, 10.0 + GRACE / 2)
    assert image.users["job-7"].namespaces == 1
    # Attached in two namespaces: the scan's count, grace or not.
    assert image.scanned({"job-7": Scanned(namespaces=2)}, 10.0 + GRACE / 2)
    assert use.namespaces == 2
    # Both gone within the grace time: one still counts; after it, none.
    assert image.scanned({}, 10.0 + GRACE - 0.1)
    assert use.namespaces == 1
    assert image.scanned({}, 10.0 + GRACE)
    assert (image.phase, image.idle_since, image.refcount) == (Phase.HOLDING, 10.0 + GRACE, 0)
    # A tree handed out to an allocation with uses adds to its use; a release ends the grace.
    opened = image.open("job-8", 30.0)
    assert image.handed("job-8", 31.0) is opened
    assert (opened.opens, opened.namespaces) == (1, 1)
    assert image.release("job-8", 32.0)
    assert image.refcount == 0
    image.open("job-8", 33.0)
    assert image.scanned({}, 34.0) is False  # nothing of a namespace left to count
    # A tree of an image that is not mounted cannot be handed out (mount it first).
    with pytest.raises(IllegalTransition):
        Image("other").handed("job-7", 40.0)


def test_every_event_that_may_change_status_counts_in_the_registry_changes() -> None:
    registry = Registry(Settings(60))
    image = registry["img"]
    counts = [registry.changes.count]

    def changed() -> bool:
        counts.append(registry.changes.count)
        return counts[-1] > counts[-2]

    image.begin_mount(0)
    assert changed()
    image.mounted(1)
    assert changed()
    use = image.open("job", 2)
    assert changed()
    image.open("job", 2)  # opens 1 -> 2: .status shows the number
    assert changed()
    image.close(use, 3)
    assert changed()
    image.acquire("other", 3)
    assert changed()
    assert not image.scanned({}, 4)  # nothing found, nothing changed...
    assert not changed()  # ...and not counted either
    image.scanned({"job": Scanned(cwd=1)}, 4)
    assert changed()
    registry.release("other", 5)
    assert changed()
    image.close(use, 6)
    assert changed()
    assert image.scanned({}, 7)  # the process left
    assert changed()
    assert image.expire(100, 60)
    assert changed()
    image.unmounted(101)
    assert changed()
