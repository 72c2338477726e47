"""The ledger: what one server writes, the next one reads, whatever moment the first died at."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from uenvfs.core import ledger, shared_ledger
from uenvfs.core.ledger import HandleKind, Slot, image_dir_record, node_record
from uenvfs.core.shared_ledger import LOG_AT, RECORD, SLOTS_AT, SharedLedger

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
    monkeypatch.setattr(shared_ledger, "LOG", 4096)
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
    monkeypatch.setattr(shared_ledger, "LOG", 1024)
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
