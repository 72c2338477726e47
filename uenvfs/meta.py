"""Looking into a uenv image without mounting it: its superblock, a validity check, its
`meta/env.json`, and the shell lines of one view of it.

Images are read with squashfs-tools-ng's `rdsquashfs` as a subprocess: `-c PATH` prints a file,
`-d` walks the whole inode and directory tree. The subprocess calls here are synchronous and
meant for the CLI; the daemon reuses the pure parts from its async code: it runs
`check_command(image)` with `trio.run_process` and hands the outcome to `check_result`, and it
can check the superblock of the first `SUPERBLOCK_SIZE` bytes with `superblock_problem`.

The format of `meta/env.json` is the one that stackinator writes and uenv reads:

    {"name": "prgenv", "description": "...", "mount": "/user-environment",
     "views": {"default": {"description": "...", "root": "/user-environment/env/default",
        "env": {"version": 1, "values": {
            "list": {"PATH": [{"op": "prepend", "value": ["/user-environment/env/default/bin"]}]},
            "scalar": {"CUDA_HOME": "/user-environment/env/default", "BOOST_ROOT": null}}}}}}

List variables take a sequence of operations `prepend`, `append`, `set`, `unset` (an unset
clears the list; a later operation starts a new one). A null scalar unsets the variable.
`${@NAME@}` in a value stands for the variable NAME of the environment the view is applied to.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MountError

RDSQUASHFS = "rdsquashfs"
ENV_JSON = "meta/env.json"
READ_TIMEOUT = 30.0
CHECK_TIMEOUT = 300.0

SUPERBLOCK_SIZE = 96
SQUASHFS_MAGIC = 0x73717368  # "hsqs" little-endian
COMPRESSORS = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}
LIST_OPS = ("prepend", "append", "set", "unset")
DEFAULT_VIEW = "default"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VIEW_VARIABLE = re.compile(r"\$\{@([A-Za-z_][A-Za-z0-9_]*)@\}")


class ImageError(MountError):
    """An image, or a file in it, cannot be read. The message says why in one line."""


class NotInImage(ImageError):
    """The path asked for does not exist in the image (e.g. an image without meta/env.json)."""


class MetaFormatError(ImageError):
    """`meta/env.json` is not what uenv expects; the message names the offending field."""


# -- running squashfs-tools-ng -------------------------------------------------------------


def image_arg(image: Path) -> str:
    """*image* as a command-line argument that cannot be taken for an option."""
    text = str(image)
    return text if text.startswith("/") else "./" + text


def _run(command: Sequence[str], timeout: float,
         keep_stdout: bool = True) -> subprocess.CompletedProcess[bytes]:
    stdout = subprocess.PIPE if keep_stdout else subprocess.DEVNULL
    try:
        return subprocess.run(list(command), stdout=stdout, stderr=subprocess.PIPE,
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{command[0]} gave no answer within {timeout:g} s",
                         command) from exc
    except OSError as exc:
        raise ImageError(f"cannot run {command[0]}: {exc.strerror} "
                         "(squashfs-tools-ng is needed)", command) from exc


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


def read_file(image: Path, path: str, timeout: float = READ_TIMEOUT) -> bytes:
    """The content of the regular file *path* (relative to the image root) in *image*.

    Raises NotInImage if the image has no such file, ImageError if it cannot be read.
    """
    command = [RDSQUASHFS, "-c", path, image_arg(image)]
    result = _run(command, timeout)
    if result.returncode == 0:
        return result.stdout
    stderr = result.stderr.decode("utf-8", "replace")
    reason = tool_reason(stderr)
    if reason.endswith("no such file or directory"):
        raise NotInImage(f"{path}: not in the image", command)
    if reason.endswith("not a regular file"):
        raise ImageError(f"{path}: not a regular file", command)
    raise ImageError(f"cannot read the image: {check_result(result.returncode, '', stderr)}",
                     command)


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


def check_image(image: Path, timeout: float = CHECK_TIMEOUT) -> str | None:
    """None if *image* is a readable SquashFS image, else why not (one line)."""
    try:
        with image.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            problem = superblock_problem(f.read(SUPERBLOCK_SIZE), size)
    except OSError as exc:
        return exc.strerror or str(exc)
    if problem is not None:
        return problem
    try:
        result = _run(check_command(image), timeout, keep_stdout=False)
    except ImageError as exc:
        return str(exc)
    return check_result(result.returncode, "", result.stderr.decode("utf-8", "replace"))


# -- meta/env.json -------------------------------------------------------------------------


@dataclass(frozen=True)
class ListOp:
    """One operation on a colon-separated list variable such as PATH."""

    op: str  # one of LIST_OPS
    values: tuple[str, ...]


@dataclass(frozen=True)
class Env:
    """A view's environment changes: list variables (operations applied in order) and scalars
    (None means unset). A name is in at most one of the two, as in uenv."""

    lists: dict[str, tuple[ListOp, ...]] = field(default_factory=dict)
    scalars: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class View:
    name: str
    description: str
    env: Env | None  # None: an old view with only an activation script


@dataclass(frozen=True)
class Meta:
    """The parts of `meta/env.json` that uenvfs uses. `mount` is where the image was built to
    be mounted (e.g. /user-environment): every path in the views refers to it."""

    name: str | None
    description: str | None
    mount: str | None
    views: dict[str, View]


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MetaFormatError(f"{where}: expected an object, found {type(value).__name__}")
    return value


def _optional_string(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise MetaFormatError(f"{where}: expected a string, found {type(value).__name__}")
    return value


def _variable(name: str, where: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise MetaFormatError(f"{where}: {name!r} is not a valid variable name")
    return name


def _list_op(entry: Any, where: str) -> ListOp:
    entry = _object(entry, where)
    op = entry.get("op")
    if op not in LIST_OPS:
        raise MetaFormatError(f"{where}.op: {op!r} is not one of {', '.join(LIST_OPS)}")
    values = entry.get("value", [] if op == "unset" else None)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise MetaFormatError(f"{where}.value: expected a list of strings")
    return ListOp(op, tuple(values))


def _env(raw: Any, where: str) -> Env:
    raw = _object(raw, where)
    version = raw.get("version", 1)
    if version != 1:
        raise MetaFormatError(f"{where}.version: {version!r} is not supported (only 1 is)")
    values = _object(raw.get("values", {}), f"{where}.values")
    lists: dict[str, tuple[ListOp, ...]] = {}
    for name, ops in _object(values.get("list", {}), f"{where}.values.list").items():
        at = f"{where}.values.list.{name}"
        if not isinstance(ops, list):
            raise MetaFormatError(f"{at}: expected a list of operations")
        lists[_variable(name, at)] = tuple(_list_op(op, f"{at}[{i}]") for i, op in enumerate(ops))
    scalars: dict[str, str | None] = {}
    for name, value in _object(values.get("scalar", {}), f"{where}.values.scalar").items():
        at = f"{where}.values.scalar.{name}"
        scalars[_variable(name, at)] = _optional_string(value, at)
        lists.pop(name, None)  # uenv: the scalar definition replaces a list one
    return Env(lists, scalars)


def _view(name: str, raw: Any) -> View:
    where = f"views.{name}"
    raw = _object(raw, where)
    description = _optional_string(raw.get("description"), f"{where}.description") or ""
    env = _env(raw["env"], f"{where}.env") if "env" in raw else None
    return View(name, description, env)


def parse_meta(data: bytes) -> Meta:
    """Parse the content of `meta/env.json`. Raises MetaFormatError saying what is wrong."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MetaFormatError(f"not valid JSON: {exc}") from exc
    raw = _object(raw, "top level")
    views = _object(raw.get("views", {}), "views")
    return Meta(
        name=_optional_string(raw.get("name"), "name"),
        description=_optional_string(raw.get("description"), "description"),
        mount=_optional_string(raw.get("mount"), "mount"),
        views={name: _view(name, view) for name, view in views.items()},
    )


def read_meta(image: Path, timeout: float = READ_TIMEOUT) -> Meta:
    """The `meta/env.json` of *image*. NotInImage if it has none, MetaFormatError if broken."""
    data = read_file(image, ENV_JSON, timeout)
    try:
        return parse_meta(data)
    except MetaFormatError as exc:
        raise MetaFormatError(f"{ENV_JSON}: {exc}") from exc


def choose_view(meta: Meta, wanted: str | None = None) -> View:
    """The view *wanted*; by default the one named "default", else the only one."""
    names = ", ".join(meta.views) or "none"
    if wanted is not None:
        if wanted not in meta.views:
            raise ImageError(f"no view {wanted!r} (views: {names})")
        return meta.views[wanted]
    if DEFAULT_VIEW in meta.views:
        return meta.views[DEFAULT_VIEW]
    if len(meta.views) == 1:
        return next(iter(meta.views.values()))
    if not meta.views:
        raise ImageError(f"{ENV_JSON} defines no view")
    raise ImageError(f"several views and none named {DEFAULT_VIEW!r}: choose one with "
                     f"--view ({names})")


# -- shell lines ---------------------------------------------------------------------------


def rewrite_paths(value: str, mount: str | None, target: str) -> str:
    """*value* with every colon-separated path under *mount* moved under *target*.

    `/user-environment/env/default/bin` becomes `/run/pact/uenv/NAME/env/default/bin` when the
    image, built for /user-environment, is served at /run/pact/uenv/NAME.
    """
    if not mount:
        return value
    mount = mount.rstrip("/")
    if not mount:  # an image built for "/" cannot be told apart from the host's paths
        return value
    parts = value.split(":")
    for i, part in enumerate(parts):
        if part == mount or part.startswith(mount + "/"):
            parts[i] = target + part[len(mount):]
    return ":".join(parts)


def shell_word(value: str) -> str:
    """*value* as one shell word: literal text quoted, `${@NAME@}` expanded from the
    environment (empty when NAME is unset, as uenv does)."""
    pieces: list[str] = []
    position = 0
    for match in _VIEW_VARIABLE.finditer(value):
        if match.start() > position:
            pieces.append(shlex.quote(value[position:match.start()]))
        pieces.append(f'"${{{match.group(1)}-}}"')
        position = match.end()
    if position < len(value) or not pieces:
        pieces.append(shlex.quote(value[position:]))
    return "".join(pieces)


def _list_line(name: str, op: ListOp, mount: str | None, target: str) -> str:
    joined = rewrite_paths(":".join(op.values), mount, target)
    if op.op == "unset":
        return f"unset {name}"
    if op.op == "set":
        return f"export {name}={shell_word(joined)}"
    if not op.values:  # nothing to add, but uenv leaves the variable set (maybe empty)
        return f'export {name}="${{{name}-}}"'
    if op.op == "prepend":
        return f'export {name}={shell_word(joined)}"${{{name}:+:${name}}}"'
    return f'export {name}="${{{name}:+${name}:}}"{shell_word(joined)}'


def shell_lines(env: Env, mount: str | None, target: str) -> list[str]:
    """The `export`/`unset` lines that apply *env*, paths under *mount* moved to *target*.

    Like uenv: scalars first, then list variables, each operation in order. Prepend and append
    keep the current value, whether or not the variable is set, without an empty entry.
    Unlike uenv, repeated entries of a list are not removed (the first one wins a lookup
    anyway) and empty entries of the current value are kept.
    """
    lines: list[str] = []
    for name, value in env.scalars.items():
        if value is None:
            lines.append(f"unset {name}")
        else:
            lines.append(f"export {name}={shell_word(rewrite_paths(value, mount, target))}")
    for name, ops in env.lists.items():
        lines.extend(_list_line(name, op, mount, target) for op in ops)
    return lines


# -- listing images ------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """One row of `uenvfs images`. `problem` says why the uenv columns are empty, if they are:
    no meta/env.json, a broken one, or an image that cannot be read."""

    name: str
    image_path: str
    size: int | None
    uenv_name: str | None = None
    description: str | None = None
    mount: str | None = None
    views: tuple[str, ...] = ()
    problem: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "image_path": self.image_path, "size": self.size,
                "uenv_name": self.uenv_name, "description": self.description,
                "mount": self.mount, "views": list(self.views), "problem": self.problem}


def describe_image(name: str, image: Path, timeout: float = READ_TIMEOUT) -> ImageInfo:
    """Name, path, size and uenv metadata of one image; never raises for a bad image."""
    try:
        size = image.stat().st_size
    except OSError as exc:
        return ImageInfo(name, str(image), None, problem=f"image missing: {exc.strerror}")
    try:
        meta = read_meta(image, timeout)
    except NotInImage:
        return ImageInfo(name, str(image), size, problem=f"no {ENV_JSON}")
    except MetaFormatError as exc:
        return ImageInfo(name, str(image), size, problem=f"broken {exc}")
    except ImageError as exc:
        return ImageInfo(name, str(image), size, problem=str(exc))
    return ImageInfo(name, str(image), size, meta.name, meta.description, meta.mount,
                     tuple(meta.views))


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_images(infos: Sequence[ImageInfo]) -> str:
    """The images as a table for people; the last column holds the description, or why
    there is none."""
    if not infos:
        return "no images\n"
    rows = [("NAME", "SIZE", "UENV", "VIEWS", "IMAGE", "DESCRIPTION")]
    for info in infos:
        note = f"({info.problem})" if info.problem else (info.description or "")
        rows.append((info.name, human_size(info.size), info.uenv_name or "-",
                     ",".join(info.views) or "-", info.image_path, note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"
