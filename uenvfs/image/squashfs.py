"""Looking into a SquashFS image without mounting it: its superblock, a validity check, and
the content of one file.

Images are read with squashfs-tools-ng's `rdsquashfs`, run through `tools.run`: `-c PATH`
prints a file, `-d` walks the whole inode and directory tree. `check_image` is the one image
check: the daemon runs it (as `check_read_image`, on the first bytes it read in a worker
thread) before the first mount of each image version, `uenvfs check` through `trio.run`.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import MountError

RDSQUASHFS = "rdsquashfs"
PACKAGE = "squashfs-tools-ng"
READ_TIMEOUT = 30.0

SUPERBLOCK_SIZE = 96
SQUASHFS_MAGIC = 0x73717368  # "hsqs" little-endian
COMPRESSORS = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}


class ImageError(MountError):
    """An image, or a file in it, cannot be read. The message says why in one line."""


class NotInImage(ImageError):
    """The path asked for does not exist in the image (e.g. an image without meta/env.json)."""


# -- running rdsquashfs ----------------------------------------------------------------------


def image_arg(image: Path) -> str:
    """*image* as a command-line argument that cannot be taken for an option."""
    text = str(image)
    return text if text.startswith("/") else "./" + text


def tool_reason(stderr: str) -> str:
    """The reason in rdsquashfs's error output, without the image path it starts with.

    rdsquashfs says `IMAGE: STAGE: REASON.` (e.g. `x.sqfs: reading super block: wrong magic
    value in super block.`) or `IMAGE: STRERROR` when the file cannot be opened.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    line = lines[-1].rstrip(".")
    staged = re.match(r"^.*?: ((?:reading|loading) [^:]*: .*)$", line)
    if staged:
        return staged.group(1)
    return line.rsplit(": ", 1)[-1] if ": " in line else line


async def read_file(image: Path, path: str, time_limit: float = READ_TIMEOUT) -> bytes:
    """The content of the regular file *path* (relative to the image root) in *image*.

    Raises NotInImage if the image has no such file, ImageError if it cannot be read.
    """
    command = [RDSQUASHFS, "-c", path, image_arg(image)]
    from . import tools

    result = await tools.run(command, time_limit, error=ImageError, package=PACKAGE)
    if result.returncode == 0:
        return result.stdout
    reason = tool_reason(result.stderr)
    if reason.endswith("no such file or directory"):
        raise NotInImage(f"{path}: not in the image", command)
    if reason.endswith("not a regular file"):
        raise ImageError(f"{path}: not a regular file", command)
    raise ImageError("cannot read the image: "
                     f"{check_result(result.returncode, '', result.stderr)}", command)


# -- the superblock ------------------------------------------------------------------------


@dataclass(frozen=True)
class Superblock:
    """What the 96-byte SquashFS 4.0 superblock says about an image."""

    inodes: int
    block_size: int
    compressor: str
    version: tuple[int, int]
    bytes_used: int


def parse_superblock(data: bytes) -> Superblock:
    """The superblock at the start of *data*. Raises ImageError if it is not one."""
    if len(data) < SUPERBLOCK_SIZE:
        raise ImageError(f"too short for a SquashFS superblock ({len(data)} bytes): "
                         "empty or truncated file")
    magic, inodes, _mtime, block_size = struct.unpack_from("<IIII", data, 0)
    if magic != SQUASHFS_MAGIC:
        raise ImageError(f"not a SquashFS image (wrong magic number {data[:4].hex()}, "
                         f"expected {struct.pack('<I', SQUASHFS_MAGIC).hex()})")
    compressor_id, _block_log, _flags, _ids, major, minor = struct.unpack_from(
        "<HHHHHH", data, 20)
    if (major, minor) != (4, 0):
        raise ImageError(f"unsupported SquashFS version {major}.{minor} (only 4.0 is)")
    (bytes_used,) = struct.unpack_from("<Q", data, 40)
    compressor = COMPRESSORS.get(compressor_id, f"unknown compressor {compressor_id}")
    return Superblock(inodes, block_size, compressor, (major, minor), bytes_used)


def superblock_problem(header: bytes, file_size: int) -> str | None:
    """Why an image whose first bytes are *header* and whose size is *file_size* is unusable,
    or None. Cheap (no subprocess), and it names a truncation that rdsquashfs only reports as
    a table "out of bounds"."""
    try:
        superblock = parse_superblock(header)
    except ImageError as exc:
        return str(exc)
    if superblock.bytes_used > file_size:
        return (f"truncated: the file has {file_size} bytes, its superblock says "
                f"{superblock.bytes_used}")
    return None


def read_superblock(image: Path) -> Superblock:
    """The superblock of the image file *image*."""
    try:
        with image.open("rb") as f:
            header = f.read(SUPERBLOCK_SIZE)
    except OSError as exc:
        raise ImageError(exc.strerror or str(exc)) from exc
    return parse_superblock(header)


# -- checking an image without mounting it -------------------------------------------------


def check_command(image: Path) -> list[str]:
    """The command that validates *image*: `rdsquashfs -d` reads the superblock, the ID and
    fragment tables and every inode and directory entry (not the file data), so a wrong magic,
    a truncation and corrupted metadata all make it fail. Its stdout is a listing of every
    entry (megabytes for a large image): send it to /dev/null."""
    return [RDSQUASHFS, "-d", image_arg(image)]


def check_result(returncode: int, stdout: str, stderr: str) -> str | None:
    """None if `check_command` succeeded, else the one-line reason to show (e.g. in .status).

    *stdout* (the listing) is not needed; a caller may pass "" after sending it to /dev/null.
    """
    del stdout  # the listing says nothing about validity that the exit status does not
    if returncode == 0:
        return None
    if returncode < 0:
        return f"{RDSQUASHFS} killed by signal {-returncode}"
    reason = tool_reason(stderr)
    explained = {
        "reading super block: wrong magic value in super block":
            "not a SquashFS image (wrong magic number)",
        "reading super block: location out of bounds":
            "too short for a SquashFS superblock: empty or truncated file",
    }
    if reason in explained:
        return explained[reason]
    if reason.endswith("location out of bounds"):
        return f"truncated or corrupt: {reason}"
    if reason.endswith("compressor error"):
        return f"corrupt metadata: {reason}"
    return reason


async def check_image(image: Path, time_limit: float) -> str | None:
    """None if *image* is a readable SquashFS image, else why not (one line).

    The superblock first (cheap, and it names a truncation), then `check_command`. Raises
    OSError if the file cannot be read, ImageError if rdsquashfs cannot be started or is
    killed after *time_limit* seconds.
    """
    with image.open("rb") as f:  # 96 bytes: not worth a worker thread
        header, size = f.read(SUPERBLOCK_SIZE), os.fstat(f.fileno()).st_size
    return await check_read_image(image, header, size, time_limit)


async def check_read_image(image: Path, header: bytes, size: int,
                           time_limit: float) -> str | None:
    """`check_image` of an image whose first bytes (*header*) and size were read already:
    the daemon reads them off the event loop, with the image file's identity."""
    problem = superblock_problem(header, size)
    if problem is not None:
        return problem
    from . import tools

    result = await tools.run(check_command(image), time_limit, error=ImageError,
                             keep_stdout=False, package=PACKAGE)
    return check_result(result.returncode, "", result.stderr)
