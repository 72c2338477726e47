"""The subcommands that read the images themselves, with no daemon: `images` (the table of
every image the sources name), `check` (validate one) and `env` (the shell lines of a view).
They find images through the configured sources as the daemon does (image/catalog.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import config as config_mod
from . import exits
from .exits import CliError

if TYPE_CHECKING:
    from ..core.labels import Record
    from ..image.catalog import Catalog


def _image_config(args: argparse.Namespace) -> config_mod.Config:
    """The configuration, with the flags of `images` and `env` (--images, --mountpoint)."""
    overrides = {
        "images": tuple(Path(p) for p in args.images) if getattr(args, "images", None) else None,
        "repos": tuple(Path(p) for p in args.repo) if getattr(args, "repo", None) else None,
        "mountpoint": Path(args.mountpoint) if getattr(args, "mountpoint", None) else None,
    }
    config_file = getattr(args, "config", None)
    try:
        return config_mod.load(Path(config_file) if config_file else None, overrides)
    except config_mod.ConfigError as exc:
        raise CliError(f"configuration: {exc}", exits.USAGE) from exc


def _catalog(cfg: config_mod.Config, required: bool = False) -> Catalog:
    """The image sources of *cfg*, read. A missing image directory holds no image; it is an
    error if *required*."""
    from ..image.catalog import Catalog

    dirs = tuple(d for d in cfg.images if d.is_dir())
    missing = [d for d in cfg.images if d not in dirs]
    if required and missing:
        raise CliError(f"image directory {missing[0]}: not a directory")
    catalog = Catalog.from_config(replace(cfg, images=dirs))
    catalog.refresh()
    return catalog


def _find_image(text: str, file_first: bool,
                load_config: Callable[[], config_mod.Config]) -> tuple[str | None, Path]:
    """(image name, image path) for *text*: a path to an image file (starting with '/' or
    '.', or any existing file that is not an image's name; no name then), or an image name or
    uenv label resolved through the image sources as the daemon does. *file_first*: an
    existing file named *text* wins over an image name."""
    from ..core.labels import LabelError, parse_label
    from ..core.names import valid_name

    as_file = Path(text)
    if text.startswith(("/", ".")) or (file_first and as_file.is_file()):
        if not as_file.is_file():
            raise CliError(f"{text}: no such image file")
        return None, as_file
    try:
        is_label = valid_name(text) or bool(parse_label(text))
    except LabelError:
        is_label = False
    if is_label:
        import trio  # not at the top: the commands to the daemon need not pay for it

        catalog = _catalog(load_config())
        path = trio.run(catalog.resolve, text) if valid_name(text) else None
        if path is not None:
            return text, path
        try:
            name = catalog.label(text)
        except LabelError as exc:
            raise CliError(str(exc)) from exc
        if name is not None:
            return name, catalog.listing()[name]
    if as_file.is_file():
        return None, as_file
    raise CliError(f"{text}: no such image (not a name or uenv label that the image sources "
                   "know, nor an image file)")


def _image_rows(catalog: Catalog, cfg: config_mod.Config
                ) -> list[tuple[str, Path, Record | None]]:
    """(name as served, image file, repository record) of every image and label: an image
    of a repository is one row per label, named as the label is served."""
    from ..image.catalog import alias_name

    labels: dict[str, list[Record]] = {}
    for record in catalog.records():
        labels.setdefault(record.id, []).append(record)
    rows: list[tuple[str, Path, Record | None]] = []
    for name, path in sorted(catalog.listing().items()):
        for record in labels.get(name, []):
            alias = alias_name(record, cfg.system, cfg.uarch)
            rows.append((alias if catalog.alias(alias) == name else name, path, record))
        if name not in labels:
            rows.append((name, path, None))
    return rows


def cmd_images(args: argparse.Namespace) -> int:
    import trio

    from ..image.table import describe_images, format_images

    cfg = _image_config(args)
    # The image directories must exist, but for the default, /images, not given with
    # --images: a node without it has no images there (it may have repositories).
    named = bool(args.images) or cfg.images != config_mod.Config().images
    catalog = _catalog(cfg, required=named)
    infos = trio.run(describe_images, _image_rows(catalog, cfg))
    if args.json:
        print(json.dumps([info.as_json() for info in infos], indent=1))
    else:
        print(format_images(infos), end="")
    return exits.OK


def cmd_check(args: argparse.Namespace) -> int:
    import time

    import trio

    from ..image.squashfs import ImageError, check_image, read_superblock
    from ..image.table import human_size

    _, path = _find_image(args.image, True, lambda: _image_config(args))
    started = time.monotonic()
    try:
        reason = trio.run(check_image, path, args.timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc)
    except ImageError as exc:  # rdsquashfs cannot run, or was killed after the timeout
        reason = str(exc)
    elapsed = time.monotonic() - started
    if reason is not None:
        raise CliError(f"{args.image}: {reason}")
    try:
        superblock = read_superblock(path)
    except ImageError as exc:  # replaced since the check
        raise CliError(f"{args.image}: {exc}") from exc
    print(f"{args.image}: ok ({superblock.inodes} inodes, {human_size(superblock.bytes_used)}"
          f", {superblock.compressor}, checked in {elapsed:.2f} s)")
    return exits.OK


def cmd_env(args: argparse.Namespace) -> int:
    import trio

    from ..image.catalog import name_of
    from ..image.squashfs import ImageError, NotInImage
    from ..image.uenv import (
        ENV_JSON,
        choose_view,
        read_image_meta,
        shell_lines,
    )

    cfg = _image_config(args)
    name, path = _find_image(args.name, False, lambda: cfg)
    if name is None:  # an image file: served under its file name without the suffix
        name = name_of(path.name) or path.name
    try:
        uenv = trio.run(read_image_meta, path)
        view = choose_view(uenv, args.view)
    except NotInImage as exc:
        raise CliError(f"{args.name}: {path} has no {ENV_JSON}, so no views") from exc
    except ImageError as exc:
        raise CliError(f"{args.name}: {exc}") from exc
    if view.env is None:
        raise CliError(f"{args.name}: view {view.name!r} has no env section (it only has an "
                       "activation script, which uenvfs does not run)")
    if not uenv.mount:
        print(f"uenvfs env: warning: {ENV_JSON} of {args.name} names no mount point: "
              "paths are printed as they are", file=sys.stderr)
    for line in shell_lines(view.env, uenv.mount, str(cfg.mountpoint / name)):
        print(line)
    return exits.OK
