"""What `uenvfs run` and `uenvfs start` set up, decided before anything is mounted. Pure.

A session puts each image at the mount point it was built for and applies views with the
image's own paths. The words on the command line:

    IMAGE[:MOUNT][,IMAGE[:MOUNT]...]    MOUNT: an absolute path; default the image's
                                        meta/env.json "mount", else /user-environment
    --view VIEW[,VIEW...]               VIEW: a view name, or IMAGE:VIEW (IMAGE being the
                                        served name or the uenv name of meta/env.json)

The job sees uenv's variables, as uenv sets them: UENV_MOUNT_LIST (`image-path:mount-point`,
comma-separated; uenv reads only paths of `[A-Za-z0-9_./-]`, so an image whose path has
another character is refused) and UENV_VIEW (`mount-point:uenv-name:view`, comma-separated;
set, if empty, without a view: uenv takes both being set as "in a uenv session"). The views
are applied as uenv applies them (image/uenv.py `apply_views`). A session inside a session
keeps the images of the outer one and adds its own; a mount point where uenv itself put an
image is refused.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..image.uenv import Meta, View, apply_views

DEFAULT_MOUNT = "/user-environment"
MOUNT_LIST = "UENV_MOUNT_LIST"
VIEW_LIST = "UENV_VIEW"

_IMAGE_SPEC = re.compile(r"(?P<image>[^,]+?)(?::(?P<mount>/[^,]*))?")
# A path as uenv parses one in UENV_MOUNT_LIST (parse.cpp, parse_path): these characters only.
_UENV_PATH = re.compile(r"[A-Za-z0-9_./-]+")
_NOT_UENV_PATH = re.compile(r"[^A-Za-z0-9_./-]")


class SessionError(Exception):
    """The command line asks for something that cannot be set up; the message says why."""


@dataclass(frozen=True)
class ImageSpec:
    image: str
    mount: str | None  # None: from meta/env.json, else DEFAULT_MOUNT


@dataclass(frozen=True)
class ViewSpec:
    image: str | None  # None: whichever image has a view of this name
    view: str


def parse_images(text: str) -> list[ImageSpec]:
    """`IMAGE[:MOUNT][,...]`. The mount point starts at the last `:` followed by `/`."""
    specs = []
    for item in text.split(","):
        match = _IMAGE_SPEC.fullmatch(item)
        if match is None:
            raise SessionError(f"{text!r}: expected IMAGE[:MOUNT][,IMAGE[:MOUNT]...]")
        mount = match["mount"]
        specs.append(ImageSpec(match["image"], None if mount is None else normal(mount)))
    return specs


def parse_views(text: str | None) -> list[ViewSpec]:
    """`VIEW[,IMAGE:VIEW...]`; an empty or missing text asks for no view."""
    views = []
    for item in (text or "").split(","):
        if not item:
            continue
        image, _, view = item.rpartition(":")
        if not view:
            raise SessionError(f"--view {text!r}: {item!r} names no view")
        views.append(ViewSpec(image or None, view))
    return views


def normal(path: str) -> str:
    """*path* without `.`, `..`, repeated or trailing slashes (`/` stays `/`)."""
    return posixpath.normpath(path).replace("//", "/", 1)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


@dataclass(frozen=True)
class Placement:
    """One image placed in the session: where uenvfs serves it and where the session puts it.
    (Not an image's lifecycle, which is core/state.py's Image.)"""

    name: str  # its name in uenvfs
    mount: str  # where the session binds it
    meta: Meta | None  # its meta/env.json, None if it has none
    image_path: str  # the SquashFS file, for UENV_MOUNT_LIST

    @property
    def uenv_name(self) -> str:
        """The name uenv gives it: meta/env.json's "name", else the served name."""
        return self.meta.name if self.meta is not None and self.meta.name else self.name


def mount_point(spec: ImageSpec, meta: Meta | None) -> str:
    if spec.mount is not None:
        return spec.mount
    if meta is not None and meta.mount:
        return normal(meta.mount)
    return DEFAULT_MOUNT


def check_mounts(images: Sequence[Placement], served_at: str,
                 bound: Mapping[str, str],
                 foreign: Mapping[str, str] | None = None) -> list[Placement]:
    """The images that still need a bind mount. Refuses two images on one mount point, a
    mount point inside another one of the session, `/`, anything inside the uenvfs mount
    point, a mount point or image file that uenv cannot read in UENV_MOUNT_LIST, a mount
    point where an enclosing session put another image (*bound*: mount point → image name of
    the binds this process already sees), and one where uenv put an image (*foreign*: mount
    point → what is there, for the message)."""
    seen: dict[str, str] = {}
    todo = []
    for image in images:
        mount = image.mount
        if not mount.startswith("/") or mount == "/":
            raise SessionError(f"{image.name}: mount point {mount!r} must be an absolute path "
                               "other than /")
        _uenv_readable(image, "image file", image.image_path)
        _uenv_readable(image, "mount point", mount)
        if _inside(mount, served_at) or _inside(served_at, mount):
            raise SessionError(f"{image.name}: mount point {mount} would hide uenvfs at "
                               f"{served_at}; choose another with {image.name}:MOUNT")
        if mount in seen:
            raise SessionError(f"{seen[mount]} and {image.name} both want mount point {mount}: "
                               f"put one elsewhere with IMAGE:MOUNT (e.g. {image.name}:/"
                               f"user-tools)")
        for other, other_name in seen.items():
            if _inside(mount, other) or _inside(other, mount):
                raise SessionError(f"mount points {other} ({other_name}) and {mount} "
                                   f"({image.name}) are inside one another")
        seen[mount] = image.name
        if mount not in bound and mount in (foreign or {}):
            raise SessionError(
                f"{mount} already holds {(foreign or {})[mount]}, which uenvfs did not put "
                "there: a uenv session (uenv start or uenv run) is running; leave it first, "
                f"or put {image.name} elsewhere with {image.name}:MOUNT")
        if mount in bound:
            if bound[mount] != image.name:
                raise SessionError(
                    f"{mount} already holds image {bound[mount]} (from an enclosing uenvfs "
                    f"run or start); put {image.name} elsewhere with {image.name}:MOUNT, or "
                    "leave the enclosing session first")
            continue  # already there: nothing to add
        todo.append(image)
    return todo


def _uenv_readable(image: Placement, what: str, path: str) -> None:
    """Refuse *path* (of *image*) if uenv could not read it in UENV_MOUNT_LIST."""
    if _UENV_PATH.fullmatch(path):
        return
    found = _NOT_UENV_PATH.search(path)
    shown = repr(found.group()) if found is not None else "an empty path"
    raise SessionError(f"{image.name}: its {what} {path} cannot be given to the command in "
                       f"{MOUNT_LIST}: uenv reads only letters, digits and _ . / - in a path "
                       f"there, not {shown}; the file or directory needs a name of those")


def choose_views(images: Sequence[Placement],
                 wanted: Iterable[ViewSpec]) -> list[tuple[Placement, View]]:
    """Each wanted view with its image, in the order asked for."""
    chosen = []
    for spec in wanted:
        candidates = [image for image in images
                      if spec.image is None or spec.image in (image.name, image.uenv_name)]
        if spec.image is not None and not candidates:
            raise SessionError(f"--view {spec.image}:{spec.view}: {spec.image} is not one of "
                               f"the session's images ({', '.join(i.name for i in images)})")
        having = [image for image in candidates
                  if image.meta is not None and spec.view in image.meta.views]
        if not having:
            raise SessionError(f"no view {spec.view!r}: " + _views_of(candidates))
        if len(having) > 1:
            raise SessionError(f"view {spec.view!r} is in several images ("
                               f"{', '.join(i.name for i in having)}): say which with "
                               f"IMAGE:{spec.view}")
        image = having[0]
        assert image.meta is not None
        view = image.meta.views[spec.view]
        if view.env is None:
            raise SessionError(f"view {spec.view!r} of {image.name} has no env section (it "
                               "only has an activation script, which uenvfs does not run)")
        chosen.append((image, view))
    return chosen


def _views_of(images: Iterable[Placement]) -> str:
    parts = []
    for image in images:
        if image.meta is None:
            parts.append(f"{image.name} has no meta/env.json")
        else:
            parts.append(f"{image.name} has {', '.join(image.meta.views) or 'no views'}")
    return "; ".join(parts)


def _entries(value: str | None) -> list[str]:
    return [entry for entry in (value or "").split(",") if entry]


def environment(environ: Mapping[str, str], images: Sequence[Placement],
                views: Sequence[tuple[Placement, View]]) -> dict[str, str]:
    """The command's environment: *environ* with the views applied as uenv applies them, and
    UENV_MOUNT_LIST and UENV_VIEW extended with this session's images and views. UENV_VIEW is
    set even when empty, as uenv sets it. An entry of an enclosing session for a mount point
    of this one is replaced; if it named another image file, the views it had there go."""
    out = apply_views([view.env for _, view in views if view.env is not None], environ)
    mine = {image.mount: image.image_path for image in images}
    kept, gone = [], set()
    for entry in _entries(environ.get(MOUNT_LIST)):
        path, _, mount = entry.rpartition(":")
        if mount not in mine:
            kept.append(entry)
        elif path != mine[mount]:
            gone.add(mount)
    out[MOUNT_LIST] = ",".join(kept + [f"{path}:{mount}" for mount, path in mine.items()])
    shown = [entry for entry in _entries(environ.get(VIEW_LIST))
             if entry.partition(":")[0] not in gone]
    shown += [f"{image.mount}:{image.uenv_name}:{view.name}" for image, view in views]
    out[VIEW_LIST] = ",".join(shown)
    return out
