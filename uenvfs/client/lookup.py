"""What `uenvfs run`, `start` and `attach` learn from the running uenvfs, through its mount:
its `.status`, an image's `meta/env.json` (reading it mounts the image, as any access does),
the name under which a label is served (its link in the mount, else the daemon's query
socket); and the `meta/` beside a repository's image. Never imports trio or pyfuse3 (they
start job steps)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from ..core.names import valid_name
from ..image.uenv import (
    ENV_JSON,
    REPOSITORY_IMAGE,
    Meta,
    MetaFormatError,
    parse_meta,
)
from .ask import ambiguity, resolve, socket_at
from .exits import RunError
from .trees import ANSWER_SECONDS


def read_status(mountpoint: Path) -> dict[str, object]:
    """The `.status` document of the uenvfs at *mountpoint*; fails if none answers there."""
    try:
        document: dict[str, object] = json.loads((mountpoint / ".status").read_bytes())
    except FileNotFoundError as exc:
        raise RunError(f"no uenvfs serving at {mountpoint} (is the uenvfs service "
                       "running?)") from exc
    except OSError as exc:
        raise RunError(f"uenvfs at {mountpoint} does not answer: {exc.strerror}") from exc
    except ValueError as exc:
        raise RunError(f"{mountpoint}/.status: {exc}") from exc
    return document


def mount_entry(document: Mapping[str, object], name: str) -> dict[str, object]:
    """The entry of image *name* in the `mounts` of a `.status` document ({} if none)."""
    mounts = document.get("mounts")
    for entry in mounts if isinstance(mounts, list) else []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return {}


def _served(mountpoint: Path) -> str:
    """What uenvfs serves, for an error message about a name it does not."""
    try:
        names = sorted(n for n in os.listdir(mountpoint) if not n.startswith("."))
    except OSError:
        return ""
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f" (uenvfs at {mountpoint} serves: {shown or 'no image'})"


def read_meta(mountpoint: Path, name: str, why: Callable[[str], object]) -> Meta | None:
    """The image's meta/env.json read through uenvfs (None if it has none); this also mounts
    the image. Fails with the reason if the image is unknown or cannot be mounted (*why*(name)
    it cannot, as uenvfs says)."""
    directory = mountpoint / name
    if not valid_name(name):
        raise RunError(f"no image or uenv label {name!r}{_served(mountpoint)}")
    try:
        os.stat(directory)
        data = (directory / ENV_JSON).read_bytes()
    except FileNotFoundError as exc:
        if not directory.exists():
            raise RunError(f"no image {name!r}{_served(mountpoint)}") from exc
        return None
    except OSError as exc:
        if exc.errno == errno.EIO:
            error = why(name)
            raise RunError(f"image {name} cannot be mounted: {error or exc.strerror} "
                           "(uenvfs status shows it)") from exc
        raise RunError(f"{directory}: {exc.strerror}") from exc
    try:
        return parse_meta(data)
    except MetaFormatError as exc:
        raise RunError(f"image {name}: {ENV_JSON}: {exc}") from exc


def served_name(mountpoint: Path, word: str) -> str:
    """The name under which uenvfs serves what *word* names: an image name as it is, a
    label's link (`prgenv-gnu+24.11+v1`, a sha256 or a one-word label) read from the mount;
    any other label as the daemon resolves it (the query socket's `resolve`, as `.control`
    reads it: whatever repositories the daemon was given, in its configuration or on its
    command line). A word the daemon knows no image of comes back as it is ("no image" says
    the rest); an ambiguous label fails with its candidates."""
    if valid_name(word):
        try:
            return os.readlink(mountpoint / word)  # a label: the link leads to the image
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not a link: an image's own name
                return word
            if exc.errno != errno.ENOENT:
                raise RunError(f"{mountpoint / word}: {exc.strerror}") from exc
    # The socket found in this thread: `run` may start none (it makes a user namespace).
    answer = resolve(mountpoint, word, socket_at(mountpoint), ANSWER_SECONDS)
    if answer["ok"]:
        return str(answer["name"])
    if answer.get("errno") == errno.errorcode[errno.ENOENT]:
        return word
    raise RunError(ambiguity(word, answer) or f"{word}: {answer.get('error')}")


def meta_beside(image_path: Path) -> Meta | None:
    """The meta/env.json beside a uenv repository's image file (`images/<sha256>/`), if any."""
    beside = image_path.parent / ENV_JSON
    if image_path.name != REPOSITORY_IMAGE:
        return None
    try:
        return parse_meta(beside.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunError(f"{beside}: {exc.strerror}") from exc
    except MetaFormatError as exc:
        raise RunError(f"{beside}: {exc}") from exc
