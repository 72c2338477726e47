"""The ledger: what one server writes, the next one reads, whatever moment the first died at."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from uenvfs.core import ledger, ledger_layout
from uenvfs.core.ledger import HandleKind, Slot, image_dir_record, node_record
from uenvfs.core.ledger_layout import LOG_AT, RECORD, SLOTS_AT
from uenvfs.core.numbers import IDLE
from uenvfs.core.shared_ledger import SharedLedger

INIT = b"I" * 104


@pytest.fixture
def written() -> Iterator[SharedLedger]:
    book = SharedLedger.create(INIT)
    book.start()
    yield book
    book.close()
    os.close(book.fd)


def again(book: SharedLedger) -> SharedLedger:
    """The ledger as a new server opens it (the same memfd, another mapping)."""
    return SharedLedger(book.fd)


def test_a_new_server_reads_what_the_last_one_wrote(written: SharedLedger) -> None:
    written.image_dir(1, "img")
    written.version(2, "img", (1, 2, 3, 4), False)
    written.version(2, "img", (1, 2, 3, 4), True)  # validated since: the last record wins
    written.node(2 << 44 | 7, b"dir", True)
    written.node(2 << 44 | 8, b"dir/f", False)
    fh_file = written.opened(HandleKind.FILE, 2 << 44 | 8, "job-1")
    fh_dir = written.opened(HandleKind.DIR, 2 << 44 | 7, "job-2")
    fh_control = written.opened(HandleKind.CONTROL, 0, "job-1", 4242)
    written.moved(fh_file, "job-3")
    written.killed(fh_dir)
    written.confirm(fh_file)  # its answer was written (fh_dir and fh_control: maybe not)
    found = again(written).read()
    assert found.init == INIT
    assert found.resumes == 0
    assert found.image_dirs == {"img": 1}
    assert found.versions == {2: ("img", (1, 2, 3, 4), True)}
    assert found.nodes == {2 << 44 | 7: (b"dir", True), 2 << 44 | 8: (b"dir/f", False)}
    assert found.last_prefix == 2
    assert found.handles == [
        Slot(fh_file, HandleKind.FILE, False, "job-3", 2 << 44 | 8),
        Slot(fh_dir, HandleKind.DIR, True, "job-2", 2 << 44 | 7, pending=True),
        Slot(fh_control, HandleKind.CONTROL, False, "job-1", 0, pid=4242, pending=True),
    ]


def test_a_slot_keeps_its_bytes_where_the_server_before_and_after_read_them(
    written: SharedLedger,
) -> None:
    """`uenvfs restart` may hand the ledger to the version before: a slot is gen, kind, flags,
    pad, allocation number, uid or data ino (by kind), node id, pid, as it always was."""
    layout = struct.Struct("=IBBHIIQQ")
    control = written.opened(HandleKind.CONTROL, 0, "job-1", 4242, uid=1000)
    data = written.opened(HandleKind.DATA, 0, "", 4343, data_ino=3)
    file = written.opened(HandleKind.FILE, 2 << 44 | 8, "job-1", 4444)

    def raw(fh: int) -> tuple[int, ...]:
        return layout.unpack_from(written.map, SLOTS_AT + (fh & 0xFFFFFFFF) * layout.size)

    assert raw(control) == (control >> 32, 4, 2, 0, 1, 1000, 0, 4242)  # 2: pending
    assert raw(data) == (data >> 32, 5, 2, 0, 0, 3, 0, 4343)
    assert raw(file) == (file >> 32, 1, 2, 0, 1, 0, 2 << 44 | 8, 4444)
    read = {slot.fh: slot for slot in again(written).read().handles}
    assert read[control] == Slot(control, HandleKind.CONTROL, False, "job-1", 0, pid=4242,
                                 uid=1000, pending=True)
    assert read[data] == Slot(data, HandleKind.DATA, False, "", 0, pid=4343, data_ino=3,
                              pending=True)
    assert read[file] == Slot(file, HandleKind.FILE, False, "job-1", 2 << 44 | 8, pid=4444,
                              pending=True)


def test_handle_numbers_are_never_given_twice(written: SharedLedger) -> None:
    first = written.opened(HandleKind.FILE, 10, "a")
    written.released(first)
    second = written.opened(HandleKind.FILE, 11, "a")
    assert first & 0xFFFFFFFF == second & 0xFFFFFFFF  # the slot is used again...
    assert first != second  # ...with another generation
    written.released(first)  # a stale number (a release the kernel sent again) changes nothing
    assert [s.fh for s in again(written).read().handles] == [second]


def test_a_resumed_ledger_goes_on_where_the_last_server_stopped(
    written: SharedLedger,
) -> None:
    kept = written.opened(HandleKind.FILE, 10, "a")
    gone = written.opened(HandleKind.FILE, 11, "b")
    written.released(gone)
    written.mark_initialized()
    book = again(written)
    found = book.read()
    book.resumed(found)
    assert book.initialized  # counting the resume keeps the flag
    new = book.opened(HandleKind.FILE, 12, "a")
    assert new not in (kept, gone)
    third = again(written)
    found = third.read()
    assert found.resumes == 1
    assert sorted(s.fh for s in found.handles) == sorted([kept, new])
    assert {s.alloc for s in found.handles} == {"a"}


def test_a_record_half_written_at_a_crash_is_not_read(written: SharedLedger) -> None:
    written.node(5, b"complete", False)
    used = written._used  # the record a crash interrupts: written, not yet counted
    at = LOG_AT + used
    RECORD.pack_into(written.map, at, ledger.NODE, 0, 4, 6)
    written.map[at + RECORD.size:at + RECORD.size + 2] = b"ha"
    assert again(written).read().nodes == {5: (b"complete", False)}


def test_a_full_log_keeps_what_is_live(written: SharedLedger,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_layout, "LOG", 4096)
    live = {(1 << 44) | i: b"live/%d" % i for i in range(5)}
    written.keep(lambda: [image_dir_record(1, "img"),
                          *(node_record(ino, rel, False) for ino, rel in live.items())])
    written.image_dir(1, "img")
    fh = written.opened(HandleKind.FILE, 1 << 44, "job-1")
    for i in range(400):  # nodes the kernel forgot long ago: dropped at the compaction
        written.node((1 << 44) | (100 + i), b"forgotten/%d" % i, False)
    assert not written.full
    found = again(written).read()
    assert {ino: rel for ino, (rel, _) in found.nodes.items() if ino in live} == live
    assert len(found.nodes) < 100  # what was forgotten is gone
    assert found.image_dirs == {"img": 1}
    assert [(s.fh, s.alloc) for s in found.handles] == [(fh, "job-1")]


def test_a_log_too_small_for_what_is_live_stops_growing(
    written: SharedLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_layout, "LOG", 1024)
    written.keep(lambda: [node_record(i, b"x" * 50, False) for i in range(100)])
    for i in range(100):
        written.node(i, b"x" * 50, False)
    assert written.full
    found = again(written).read()
    assert 0 < len(found.nodes) < 100  # what it held before it filled up is still there


def test_not_a_ledger_is_refused() -> None:
    fd = os.memfd_create("not-a-ledger")
    try:
        with pytest.raises(ledger.LedgerError):
            SharedLedger(fd).read()
    finally:
        os.close(fd)


def test_a_node_looked_up_again_takes_no_more_room(written: SharedLedger) -> None:
    written.node(5, b"a/b", False)
    used = written._used
    written.node(5, b"a/b", False)  # the kernel forgot it and looked it up again
    written.node(5, b"other/name", False)  # or found it by another name (a hard link)
    assert written._used == used
    assert again(written).read().nodes == {5: (b"a/b", False)}


def test_a_handle_whose_answer_may_be_lost_is_kept_only_if_its_opener_holds_it(
    written: SharedLedger,
) -> None:
    from uenvfs.kernel.procscan import Hold
    from uenvfs.server.resume import settle

    got = written.opened(HandleKind.FILE, 10, "job", 100)  # pid 100 holds inode 10
    lost = written.opened(HandleKind.FILE, 11, "job", 100)  # but not 11: its open is sent again
    earlier = written.opened(HandleKind.FILE, 10, "job", 200)  # pid 200 holds 10 once...
    written.confirm(earlier)
    twice = written.opened(HandleKind.FILE, 10, "job", 200)  # ...so this second one never got there
    closed = written.opened(HandleKind.DIR, 12, "job", 300)  # pid 300 is gone (it closed it)
    holds = {100: [Hold(100, 100, 0, "fd", 10, 3)], 200: [Hold(200, 200, 0, "map", 10)],
             300: []}
    book = again(written)
    found = book.read()
    book.resumed(found)
    kept = settle(found.handles, book, 42, lambda pid, dev: holds[pid])
    assert [s.fh for s in kept] == [got, earlier]
    assert not {lost, twice, closed} & {s.fh for s in again(written).read().handles}
    assert [(s.fh, s.pending) for s in again(written).read().handles] == [
        (got, False), (earlier, False)]


def alloc_records(book: SharedLedger) -> list[tuple[int, str]]:
    """The allocation records of the active half of the log, in order."""
    head = ledger_layout.header(book.map)
    return [(number, data.decode()) for kind, _, number, data
            in ledger_layout.records(book.map, head.active, head.used[head.active])
            if kind == ledger.ALLOC]


def test_an_allocation_is_kept_only_while_a_handle_counts_for_it(written: SharedLedger) -> None:
    job = written.opened(HandleKind.FILE, 10, "job", uid=1000)
    for n in range(1000):  # made-up names, each for one open and close
        written.released(written.opened(HandleKind.FILE, 11, f"made-up-{n}", uid=65534))
    assert written.allocations == {"job": 1}
    # Numbers handed out again: a few kept named while unused (core/numbers.py), no more.
    assert {number for number, _ in alloc_records(written)} == set(range(1, IDLE + 3))
    moved = written.opened(HandleKind.FILE, 12, "made-up-x")
    written.moved(moved, "job")  # an executable that counts for its program's allocation
    assert written.allocations == {"job": 1}
    found = again(written).read()
    assert [(s.fh, s.alloc, s.uid) for s in found.handles] == [(job, "job", 1000),
                                                               (moved, "job", 0)]


def test_a_compaction_copies_the_allocations_in_use_only(
    written: SharedLedger, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ledger_layout, "LOG", 8192)
    keep = written.opened(HandleKind.DIR, 7, "job")
    for n in range(2000):
        held = written.opened(HandleKind.FILE, 8, f"made-up-{n:04d}")
        written.released(held)
    assert not written.full
    assert alloc_records(written)[0] == (1, "job")  # a compaction kept it, and it alone
    assert [s.alloc for s in again(written).read().handles] == ["job"]
    written.released(keep)
    assert written.allocations == {}


def test_the_opener_uid_is_in_every_slot_and_a_format_1_ledger_is_carried_on(
    written: SharedLedger,
) -> None:
    data = written.opened(HandleKind.DATA, 0, "", 4343, uid=65534, data_ino=3)
    root = written.opened(HandleKind.ROOT_DIR, 0, "", 4444, uid=65534)
    read = {s.fh: s for s in again(written).read().handles}
    assert (read[data].uid, read[data].data_ino, read[data].ino) == (65534, 3, 0)
    assert read[root].uid == 65534
    # A ledger of format 1 (the version before): numbers never handed out again, no uids.
    struct.pack_into("=I", written.map, 8, 1)
    struct.pack_into("=Q", written.map, SLOTS_AT + (data & 0xFFFFFFFF) * 32 + 16, 0)
    book = again(written)
    found = book.read()
    assert {s.fh: s.uid for s in found.handles} == {data: 0, root: 65534}
    book.resumed(found)
    assert struct.unpack_from("=I", written.map, 8)[0] == ledger_layout.FORMAT == 2


def test_a_format_the_ledger_does_not_know_is_refused(written: SharedLedger) -> None:
    struct.pack_into("=I", written.map, 8, 3)
    with pytest.raises(ledger.LedgerError, match="not a uenvfs ledger of format 1 or 2"):
        again(written).read()


def test_handles_spared_at_a_read_are_dead_and_never_read(written: SharedLedger) -> None:
    kept = written.opened(HandleKind.FILE, 10, "job", uid=1000)
    written.confirm(kept)
    spared = [written.opened(HandleKind.DIR, 11, "made-up", uid=65534) for _ in range(3)]
    for fh in spared:
        written.confirm(fh)
    pending = written.opened(HandleKind.DIR, 11, "made-up", uid=65534)  # maybe never got it
    status = written.opened(HandleKind.DATA, 0, "", uid=1000, data_ino=3)
    book = again(written)
    assert book.holders() == {(HandleKind.FILE, 1000): 1, (HandleKind.DIR, 65534): 4,
                              (HandleKind.DATA, 1000): 1}
    found = book.read(lambda kind, uid: uid == 65534)
    assert [s.fh for s in found.handles] == [kept, status]
    assert found.spared == {(HandleKind.DIR, 65534): 4}
    book.resumed(found)
    assert all(book.is_dead(fh) for fh in spared)
    assert not book.is_dead(pending)  # freed: its slot is handed out again
    assert not book.is_dead(kept)
    for fh in spared:
        book.released(fh)
    assert book.allocations == {"job": 1}
    assert [s.fh for s in again(written).read().handles] == [kept, status]
