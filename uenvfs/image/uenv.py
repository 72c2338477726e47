"""A uenv image's `meta/env.json`, its views, and the shell lines of one view.

The format of `meta/env.json` is the one that stackinator writes and uenv reads:

    {"name": "prgenv", "description": "...", "mount": "/user-environment",
     "views": {"default": {"description": "...", "root": "/user-environment/env/default",
        "env": {"version": 1, "values": {
            "list": {"PATH": [{"op": "prepend", "value": ["/user-environment/env/default/bin"]}]},
            "scalar": {"CUDA_HOME": "/user-environment/env/default", "BOOST_ROOT": null}}}}}}

List variables take a sequence of operations `prepend`, `append`, `set`, `unset` (an unset
clears the list; a later operation starts a new one). A null scalar unsets the variable.
`${@NAME@}` in a value stands for the variable NAME of the environment the view is applied to.

Two ways to apply views: `shell_lines` (for `uenvfs env`: lines for the user's shell, paths
moved to where uenvfs serves the image) and `apply_views` (for `uenvfs run`: the environment
itself, exactly as uenv makes it).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .squashfs import READ_TIMEOUT, ImageError, read_file

ENV_JSON = "meta/env.json"
LIST_OPS = ("prepend", "append", "set", "unset")
DEFAULT_VIEW = "default"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VIEW_VARIABLE = re.compile(r"\$\{@([A-Za-z_][A-Za-z0-9_]*)@\}")


class MetaFormatError(ImageError):
    """`meta/env.json` is not what uenv expects; the message names the offending field."""


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


async def read_meta(image: Path, time_limit: float = READ_TIMEOUT) -> Meta:
    """The `meta/env.json` of *image*. NotInImage if it has none, MetaFormatError if broken."""
    data = await read_file(image, ENV_JSON, time_limit)
    try:
        return parse_meta(data)
    except MetaFormatError as exc:
        raise MetaFormatError(f"{ENV_JSON}: {exc}") from exc


REPOSITORY_IMAGE = "store.squashfs"  # a uenv repository's image file, meta/ beside it


async def read_image_meta(image: Path, time_limit: float = READ_TIMEOUT) -> Meta:
    """`read_meta`, but for the image of a uenv repository (`images/<sha256>/store.squashfs`)
    from the `meta/env.json` beside it when it is there: no need to open the image."""
    beside = image.parent / ENV_JSON
    if image.name != REPOSITORY_IMAGE or not beside.is_file():
        return await read_meta(image, time_limit)
    try:
        return parse_meta(beside.read_bytes())
    except OSError as exc:
        raise ImageError(f"{beside}: {exc.strerror}", []) from exc
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
    Unlike uenv (and `apply_views`, which `uenvfs run` uses), repeated entries of a list are
    not removed (the first one wins a lookup anyway) and empty entries of the current value
    are kept: these lines run in the user's shell, which does the rest.
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


# -- the environment itself ------------------------------------------------------------------


def expand(value: str, environ: Mapping[str, str]) -> str:
    """*value* with each `${@NAME@}` replaced by NAME of *environ*, as uenv expands it: empty
    when NAME is unset or not a variable name, and an unterminated `${@...` dropped with the
    rest of *value*."""
    pieces = []
    position = 0
    while (start := value.find("${@", position)) >= 0:
        pieces.append(value[position:start])
        end = value.find("@}", start + 3)
        if end < 0:
            return "".join(pieces)
        name = value[start + 3:end]
        if _IDENTIFIER.fullmatch(name):
            pieces.append(environ.get(name, ""))
        position = end + 2
    pieces.append(value[position:])
    return "".join(pieces)


def merge(envs: Iterable[Env]) -> Env:
    """The views *envs* as one, as uenv merges the views of a session: a scalar of a later
    view replaces an earlier one's, and the operations on a list variable are those of
    every view, in order. (A scalar and a list of one name from two views both stay: the
    scalar is applied first.)"""
    lists: dict[str, tuple[ListOp, ...]] = {}
    scalars: dict[str, str | None] = {}
    for env in envs:
        scalars.update(env.scalars)
        for name, ops in env.lists.items():
            lists[name] = lists.get(name, ()) + ops
    return Env(lists, scalars)


def apply_views(envs: Iterable[Env], environ: Mapping[str, str]) -> dict[str, str]:
    """*environ* with the views *envs* applied as uenv applies them (`uenv run`, `start`):
    the views merged (`merge`), then every scalar, then each list variable: its current value
    split at ':', every operation applied in order, the empty entries and every repeated one
    but the first dropped, joined, and `${@NAME@}` expanded in the result. A list whose last
    operation is `unset` is unset."""
    merged = merge(envs)
    out = dict(environ)
    for name, value in merged.scalars.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = expand(value, out)
    for name, ops in merged.lists.items():
        entries = out.get(name, "").split(":")
        present = True
        for op in ops:
            present = op.op != "unset"
            if op.op == "set":
                entries = list(op.values)
            elif op.op == "prepend":
                entries = [*op.values, *entries]
            elif op.op == "append":
                entries = [*entries, *op.values]
            else:
                entries = []
        if present:
            out[name] = expand(":".join(dict.fromkeys(e for e in entries if e)), out)
        else:
            out.pop(name, None)
    return out
