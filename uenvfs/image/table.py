"""The image table of `uenvfs images`: each image's name, path, size and uenv metadata."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..core.labels import Record
from .squashfs import READ_TIMEOUT, ImageError, NotInImage
from .uenv import ENV_JSON, MetaFormatError, read_image_meta


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
    record: Record | None = None  # the repository record of this label, if it is one

    def as_json(self) -> dict[str, Any]:
        r = self.record
        return {"name": self.name, "image_path": self.image_path, "size": self.size,
                "uenv_name": self.uenv_name, "description": self.description,
                "mount": self.mount, "views": list(self.views), "problem": self.problem,
                "label": r and r.label, "sha256": r and r.sha256, "id": r and r.id,
                "date": r and r.date, "system": r and r.system, "uarch": r and r.uarch}


async def describe_image(name: str, image: Path, time_limit: float = READ_TIMEOUT,
                         record: Record | None = None) -> ImageInfo:
    """Name, path, size and uenv metadata of one image (a repository's from the meta/ beside
    it); never raises for a bad image. *record*: the repository record of this label."""
    try:
        size = (await trio.Path(image).stat()).st_size
    except OSError as exc:
        return ImageInfo(name, str(image), None, problem=f"image missing: {exc.strerror}",
                         record=record)
    try:
        meta = await read_image_meta(image, time_limit)
    except NotInImage:
        return ImageInfo(name, str(image), size, problem=f"no {ENV_JSON}", record=record)
    except MetaFormatError as exc:
        return ImageInfo(name, str(image), size, problem=f"broken {exc}", record=record)
    except ImageError as exc:
        return ImageInfo(name, str(image), size, problem=str(exc), record=record)
    return ImageInfo(name, str(image), size, meta.name, meta.description, meta.mount,
                     tuple(meta.views), record=record)


async def describe_images(
        images: Iterable[tuple[str, Path, Record | None]]) -> list[ImageInfo]:
    """`describe_image` of each (name, path, record), one after the other."""
    return [await describe_image(name, path, record=record) for name, path, record in images]


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
