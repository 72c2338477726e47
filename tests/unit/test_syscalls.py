"""kernel/libc.py: the system call numbers per architecture, the wrappers' errors, and what each
feature that needs a raw system call does on an architecture whose numbers uenvfs does not
know: it says so once, never makes a call, and falls back safely."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import struct
from pathlib import Path

import pytest

from uenvfs.core.ledger import HandleKind
from uenvfs.core.shared_ledger import SharedLedger
from uenvfs.kernel import cache, libc, procscan
from uenvfs.kernel.procscan import Hold
from uenvfs.server.resume import settle

# Verified against the kernel's tables (see kernel/libc.py); a test so that nobody "fixes" one.
KCMP = {"x86_64": 312, "aarch64": 272, "riscv64": 272, "loongarch64": 272, "ppc64le": 354,
        "ppc64": 354, "s390x": 343}


def test_known_architectures() -> None:
    for arch, kcmp in KCMP.items():
        assert libc.number("kcmp", arch) == kcmp
        assert libc.number("openat2", arch) == 437
        assert libc.number("cachestat", arch) == 451
    assert set(libc.NUMBERS) == {*KCMP, "aarch64_be"}


def test_an_unknown_architecture_or_a_32_bit_process_has_no_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert libc.number("kcmp", "sparc64") is None
    assert libc.number("no_such_call", "x86_64") is None
    monkeypatch.setattr(struct, "calcsize", lambda fmt: 4)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    arch = libc._architecture()
    assert arch == "x86_64 (32-bit process)"
    assert libc.number("kcmp", arch) is None


@pytest.fixture
def unknown(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """An architecture uenvfs knows no numbers of; what reaches syscall(2) is recorded (it
    must stay empty). The features' memory of missing calls starts empty."""
    called: list[tuple[object, ...]] = []

    def syscall(*args: object) -> int:
        called.append(args)
        return -1

    monkeypatch.setattr(libc, "ARCH", "sparc64")
    monkeypatch.setattr(libc, "_syscall", syscall)
    monkeypatch.setattr(procscan, "_no_kcmp", False)
    monkeypatch.setattr(cache, "_missing", set())
    return called


def test_a_raw_call_without_a_number_is_enosys_and_no_call(
    unknown: list[tuple[object, ...]],
) -> None:
    with pytest.raises(OSError, match="kcmp: uenvfs does not know its number on sparc64") as e:
        libc.kcmp(1, 1, 0, 0, 0)
    assert e.value.errno == errno.ENOSYS
    with pytest.raises(OSError, match="openat2"):
        libc.openat2(libc.AT_FDCWD, b"/", None, 24)
    assert unknown == []


def holds() -> list[Hold]:
    """Descriptors of inode 5: two in pid 10 (a dup or two opens: only kcmp can tell), one in
    pid 11."""
    return [Hold(10, 10, 0, "fd", 5, 3), Hold(10, 10, 0, "fd", 5, 4), Hold(11, 11, 0, "fd", 5, 3)]


def test_without_kcmp_every_descriptor_is_an_open_and_it_is_said_once(
    unknown: list[tuple[object, ...]], caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, c = holds()
    with caplog.at_level(logging.INFO):
        assert procscan.same_description(a, a)
        assert not procscan.same_description(a, b)
        assert procscan.descriptions([a, b, c]) == [[a], [b], [c]]
        assert procscan.opens_of([a, b], 5) == 2  # the most it can be
    assert unknown == []
    said = [r for r in caplog.records if "kcmp" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == logging.WARNING
    assert "sparc64" in said[0].getMessage()


def test_without_kcmp_a_pending_handle_its_opener_may_hold_is_kept(
    unknown: list[tuple[object, ...]],
) -> None:
    """pid 10 holds inode 5 through two descriptors; one handle is confirmed, one pending.
    Whether the descriptors are one open (a dup: the pending open never got there) or two
    cannot be told: the pending handle is kept."""
    book = SharedLedger.create(b"I" * 104)
    try:
        book.start()
        confirmed = book.opened(HandleKind.FILE, 5, "job", 10)
        book.confirm(confirmed)
        pending = book.opened(HandleKind.FILE, 5, "job", 10)
        found = book.read()
        kept = settle(found.handles, book, 42, lambda pid, dev: holds()[:2])
        assert [s.fh for s in kept] == [confirmed, pending]
        assert unknown == []
    finally:
        book.close()
        os.close(book.fd)


def test_without_openat2_and_cachestat_nothing_is_cached_and_it_is_said_once(
    unknown: list[tuple[object, ...]], caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(3):
                assert cache.open_cached(os.fsencode(path), os.O_RDONLY) is None
                assert cache.lstat_cached(os.fsencode(path)) is None
                assert cache.is_cached(fd, 0, 100) is False
    finally:
        os.close(fd)
    assert unknown == []
    for call in ("openat2", "cachestat"):
        said = [r for r in caplog.records if r.getMessage().startswith(call)]
        assert len(said) == 1, call
        assert "sparc64" in said[0].getMessage()


def test_the_wrappers_raise_errno_and_name_the_call(tmp_path: Path) -> None:
    missing = os.fsencode(tmp_path / "missing")
    buf = ctypes.create_string_buffer(procscan.STATX_SIZE)
    with pytest.raises(FileNotFoundError, match="statx"):
        libc.statx(missing, 0, procscan.STATX_INO, buf)
    with pytest.raises(OSError, match="umount2") as raised:
        libc.umount2(missing, 0)
    assert raised.value.errno in (errno.ENOENT, errno.EPERM)
    with pytest.raises(OSError, match="mount") as raised:
        libc.mount(b"none", missing, b"tmpfs", 0, None)
    assert raised.value.errno in (errno.ENOENT, errno.EPERM)
    libc.unshare(0)  # nothing to unshare: succeeds


def test_an_openat2_without_resolve_cached_is_not_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Linux 5.6 to 5.11 have openat2 but answer EINVAL to RESOLVE_CACHED: the open goes to
    a worker thread (before, it failed with EINVAL)."""
    def openat2(dirfd: int, path: bytes, how: object, size: int) -> int:
        raise OSError(errno.EINVAL, "openat2: Invalid argument")

    monkeypatch.setattr(cache, "_missing", set())
    monkeypatch.setattr(libc, "openat2", openat2)
    assert cache.open_cached(b"/", os.O_RDONLY) is None
    assert cache.lstat_cached(b"/") is None
