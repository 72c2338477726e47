"""What `uenvfs run` and `uenvfs start` set up, decided before anything is mounted. Pure.

A session puts each image at the mount point it was built for and applies views with the
image's own paths. The words on the command line:

    IMAGE[:MOUNT][,IMAGE[:MOUNT]...]    MOUNT: an absolute path; default the image's
                                        meta/env.json "mount", else /user-environment
    --view VIEW[,VIEW...]               VIEW: a view name, or IMAGE:VIEW (IMAGE being the
                                        served name or the uenv name of meta/env.json)

The job sees uenv's variables: UENV_MOUNT_LIST (`image-path:mount-point`, comma-separated)
and UENV_VIEW (`mount-point:uenv-name:view`, comma-separated). A session inside a session
keeps the images of the outer one and adds its own.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..image.uenv import Meta, View, apply_env

DEFAULT_MOUNT = "/user-environment"
MOUNT_LIST = "UENV_MOUNT_LIST"
VIEW_LIST = "UENV_VIEW"

_IMAGE_SPEC = re.compile(r"(?P<image>[^,]+?)(?::(?P<mount>/[^,]*))?")


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
                 bound: Mapping[str, str]) -> list[Placement]:
    """The images that still need a bind mount. Refuses two images on one mount point, a
    mount point inside another one of the session, `/`, anything inside the uenvfs mount
    point, and a mount point where an enclosing session put another image (*bound*: mount
    point → image name of the binds this process already sees)."""
    seen: dict[str, str] = {}
    todo = []
    for image in images:
        mount = image.mount
        if not mount.startswith("/") or mount == "/":
            raise SessionError(f"{image.name}: mount point {mount!r} must be an absolute path "
                               "other than /")
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
        if mount in bound:
            if bound[mount] != image.name:
                raise SessionError(
                    f"{mount} already holds image {bound[mount]} (from an enclosing uenvfs "
                    f"run or start); put {image.name} elsewhere with {image.name}:MOUNT, or "
                    "leave the enclosing session first")
            continue  # already there: nothing to add
        todo.append(image)
    return todo


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
    """The command's environment: *environ* with the views applied in order, and
    UENV_MOUNT_LIST and UENV_VIEW extended with this session's images and views (entries of
    an enclosing session for the same mount points are replaced)."""
    out = dict(environ)
    for _, view in views:
        assert view.env is not None
        out = apply_env(view.env, out)
    mounts = {image.mount for image in images}
    kept = [entry for entry in _entries(environ.get(MOUNT_LIST))
            if entry.rpartition(":")[2] not in mounts]
    out[MOUNT_LIST] = ",".join(kept + [f"{image.image_path}:{image.mount}" for image in images])
    if views:
        shown = _entries(environ.get(VIEW_LIST)) + [
            f"{image.mount}:{image.uenv_name}:{view.name}" for image, view in views]
        out[VIEW_LIST] = ",".join(shown)
    return out
