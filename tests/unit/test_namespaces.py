"""Mount namespaces that hold images, on a fake /proc: which namespaces a scan finds (not ours,
not the copy of our own mount every new namespace inherits), how it reads each process once,
and which allocations it counts (pure, but for reading files)."""

from __future__ import annotations

import os
from pathlib import Path

from uenvfs.core.model import InodePrefixes
from uenvfs.fuse import uses
from uenvfs.fuse.allocation import AllocationResolver, Process
from uenvfs.fuse.inodes import InodeTable
from uenvfs.kernel import procscan

OURS = 4026531840
IMAGE = os.makedev(7, 3)  # the device of the backing mount of "img" ...
OTHER = os.makedev(7, 4)  # ... and of "other"
BACKING = {IMAGE: ("img", "/state/mnt/img"), OTHER: ("other", "/state/mnt/other")}


def line(mount_id: int, dev: int, mount_point: str) -> str:
    return (f"{mount_id} 1 {os.major(dev)}:{os.minor(dev)} / {mount_point} ro - squashfs "
            f"/dev/loop{os.minor(dev)} ro\n")


# Every namespace made while both images were mounted inherits a copy of each backing mount
# at its place: that is nobody's use.
COPIES = line(30, IMAGE, "/state/mnt/img") + line(31, OTHER, "/state/mnt/other")


def process(proc: Path, pid: int, namespace: int, mounts: str = "", alloc: str = "job-1",
            uid: int = 0) -> None:
    base = proc / str(pid)
    (base / "ns").mkdir(parents=True)
    (base / "ns/mnt").symlink_to(f"mnt:[{namespace}]")
    (base / "mountinfo").write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n" + mounts)
    (base / "status").write_text(f"Name:\tx\nTgid:\t{pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (base / "cgroup").write_text("0::/user.slice\n")
    (base / "environ").write_bytes(f"PACT_ALLOCATION_ID={alloc}\0".encode())


def fake_proc(root: Path) -> Path:
    """Our namespace (a bind of img there is not a job's: skipped); a job's namespace with
    img bound at /user-environment (two processes); one with only the inherited copies; one
    holding both images, with processes of two allocations; one whose process is gone."""
    proc = root / "proc"
    process(proc, 1, OURS, COPIES + line(40, IMAGE, "/mnt/bound-by-root"))
    (proc / "self").symlink_to("1")
    process(proc, 100, 111, COPIES + line(41, IMAGE, "/user-environment"))
    process(proc, 101, 111, COPIES + line(41, IMAGE, "/user-environment"))
    process(proc, 200, 222, COPIES)
    both = COPIES + line(42, IMAGE, "/user-environment") + line(43, OTHER, "/user-tools")
    process(proc, 300, 333, both, alloc="job-3")
    process(proc, 301, 333, both, alloc="job-4")
    (proc / "400/ns").mkdir(parents=True)  # gone since /proc was listed: no link, no table
    (proc / "cpuinfo").write_text("not a process\n")
    return proc


def test_the_namespaces_holding_images_apart_from_ours_and_the_copies(tmp_path: Path) -> None:
    proc = bytes(fake_proc(tmp_path))
    assert procscan.mount_namespace(proc + b"/100") == 111
    assert procscan.mount_namespace(proc + b"/400") is None
    assert procscan.by_namespace(proc) == {OURS: [1], 111: [100, 101], 222: [200],
                                           333: [300, 301]}
    paths = {dev: path for dev, (_, path) in BACKING.items()}
    found = sorted(procscan.namespaces_holding(paths, proc), key=lambda n: n.ino)
    assert found == [procscan.Namespace(111, (100, 101), frozenset({IMAGE})),
                     procscan.Namespace(333, (300, 301), frozenset({IMAGE, OTHER}))]
    assert procscan.namespaces_holding({}, proc) == []


def test_a_scan_counts_the_namespaces_of_each_allocation(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    resolver = AllocationResolver(proc)
    read: list[int] = []

    def reading(pid: int, uid: int) -> Process:
        read.append(pid)
        return resolver.read(pid, uid)

    found = uses.scan(None, procscan.CWD_KINDS, reading, BACKING, proc=bytes(proc))
    assert sorted(read) == [100, 101, 300, 301]  # once each, in the namespaces that hold
    assert found.devices == {IMAGE: "img", OTHER: "other"}
    scanner = uses.UseScanner(Path(), InodeTable(InodePrefixes()), resolver, None)  # type: ignore[arg-type]
    holdings = scanner.holdings(found)
    assert {image: {alloc: dict(kinds) for alloc, kinds in users.items()}
            for image, users in holdings.items()} == {
        "img": {"job-1": {"ns": {111}}, "job-3": {"ns": {333}}, "job-4": {"ns": {333}}},
        "other": {"job-3": {"ns": {333}}, "job-4": {"ns": {333}}}}
    assert sorted(scanner.holders["img"]) == [("job-1", [100, 101]), ("job-3", [300]),
                                              ("job-4", [301])]
    # The periodic scans read a namespace's processes again only once they change.
    known = {(n.ino, n.pids): {pid: found.processes[pid] for pid in n.pids}
             for n in found.namespaces}
    read.clear()
    again = uses.scan(None, procscan.CWD_KINDS, reading, BACKING, known, bytes(proc))
    assert read == []
    assert again.processes == found.processes
    process(proc, 102, 111, COPIES + line(41, IMAGE, "/user-environment"), alloc="job-2")
    uses.scan(None, procscan.CWD_KINDS, reading, BACKING, known, bytes(proc))
    assert sorted(read) == [100, 101, 102]
