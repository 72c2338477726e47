"""The loop-device structures handed to the kernel, byte for byte (linux/loop.h)."""

from __future__ import annotations

import struct

from uenvfs.kernel import loop


def test_loop_config_layout() -> None:
    config = loop.loop_config(7, b"/images/x.sqfs")
    assert len(config) == 304  # struct loop_config: fd, block_size, loop_info64 (232), 8 x u64
    fd, block_size = struct.unpack_from("=II", config, 0)
    assert (fd, block_size) == (7, 0)
    # loop_info64 starts at 8: five u64 (device ... sizelimit), then number, 2 x encryption,
    # and lo_flags at 8 + 40 + 12.
    (flags,) = struct.unpack_from("=I", config, 60)
    assert flags == loop.LO_FLAGS_READ_ONLY | loop.LO_FLAGS_AUTOCLEAR
    assert config[64:64 + 15] == b"/images/x.sqfs\0"
    long_name = loop.loop_config(3, b"x" * 100)
    assert long_name[64:64 + 64] == b"x" * 63 + b"\0"  # truncated, still terminated
