"""The inode table: numbers per image name and version, lookups counted until FORGET."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest

from uenvfs.core.model import PREFIX_SHIFT, ImageVersion, InodePrefixes
from uenvfs.fuse.inodes import INO_MASK, InodeTable, backing_path, child_ino


def test_image_directories_keep_their_number_and_versions_get_new_prefixes() -> None:
    prefixes = InodePrefixes()
    table = InodeTable(prefixes)
    a = table.image_ino("a")
    version = ImageVersion(prefixes.new(), (1, 2, 3, 4))  # as the manager makes them
    assert table.image_ino("a") == a == 1 << PREFIX_SHIFT
    assert table.image_ino("b") == 3 << PREFIX_SHIFT
    assert version.prefix == 2
    assert (table[a].image, table[a].prefix, table[a].rel) == ("a", 0, b"")


def test_lookups_are_counted_until_the_kernel_forgets_them() -> None:
    table = InodeTable(InodePrefixes())
    image = table[table.image_ino("img")]
    table.add_lookup(2 << PREFIX_SHIFT | 5, image, 2, b"dir", 0o40755)
    d = table[2 << PREFIX_SHIFT | 5]
    assert (d.rel, d.is_dir, d.lookups) == (b"dir", True, 1)
    table.add_lookup(2 << PREFIX_SHIFT | 6, d, 2, b"file", 0o100644)
    table.add_lookup(2 << PREFIX_SHIFT | 6, d, 2, b"file", 0o100644)
    f = table[2 << PREFIX_SHIFT | 6]
    assert (f.rel, f.is_dir, f.lookups) == (b"dir/file", False, 2)
    table.forget([(pyfuse3.InodeT(f.ino), 1), (pyfuse3.InodeT(image.ino), 5)])
    assert f.ino in table
    assert image.ino in table  # image directories live forever
    table.forget([(pyfuse3.InodeT(f.ino), 1), (pyfuse3.InodeT(12345), 1)])
    assert f.ino not in table
    with pytest.raises(pyfuse3.FUSEError) as info:
        table[f.ino]
    assert info.value.errno == errno.ESTALE


def test_a_node_of_another_version_is_stale(tmp_path: Path) -> None:
    table = InodeTable(InodePrefixes())
    image = table[table.image_ino("img")]
    table.add_lookup(2 << PREFIX_SHIFT | 5, image, 2, b"dir", 0o40755)
    node = table[2 << PREFIX_SHIFT | 5]
    mount: Any = SimpleNamespace(version=ImageVersion(2, (0, 0, 0, 0)), root=b"/backing")
    assert backing_path(node, mount) == (mount, b"/backing/dir")
    assert backing_path(image, mount) == (mount, b"/backing")
    mount.version = ImageVersion(3, (0, 0, 0, 1))  # the image file was replaced
    assert backing_path(image, mount) == (mount, b"/backing")
    with pytest.raises(pyfuse3.FUSEError) as info:
        backing_path(node, mount)
    assert info.value.errno == errno.ESTALE


def test_child_inode_numbers_must_fit_under_the_prefix(tmp_path: Path) -> None:
    st = os.lstat(tmp_path)
    assert child_ino(7, st) == 7 << PREFIX_SHIFT | st.st_ino
    huge = os.stat_result((0o40755, INO_MASK + 1, 0, 1, 0, 0, 0, 0, 0, 0))
    with pytest.raises(pyfuse3.FUSEError) as info:
        child_ino(7, huge)
    assert info.value.errno == errno.EOVERFLOW
