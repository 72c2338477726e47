"""`uenvfs images`, `env` and `check` on a uenv repository: one row per label with the
repository's fields, metadata read from the meta/ beside each image (the image is not opened
for it), labels resolved as the daemon resolves them. Real images and a real index.db."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from uenvfs.client import exits

from ..support import build_image
from ..uenv_repos import Pulled, make_repository
from .cli_support import one_line_error, run

pytestmark = pytest.mark.skipif(
    shutil.which("gensquashfs") is None or shutil.which("rdsquashfs") is None,
    reason="needs gensquashfs and rdsquashfs (squashfs-tools-ng)",
)

ENV = {"name": "prgenv-gnu", "description": "GNU toolchain", "mount": "/user-environment",
       "views": {"default": {"description": "", "root": "/user-environment/env/default",
                             "env": {"version": 1, "values": {"list": {"PATH": [
                                 {"op": "prepend",
                                  "value": ["/user-environment/env/default/bin"]}]}}}}}}


def _repo(tmp_path: Path) -> tuple[Path, Pulled, Pulled]:
    # The images hold no meta/env.json: what the listing shows comes from the repository's
    # meta/ directory beside each image.
    new = Pulled(build_image(tmp_path / "n.sqfs", {"a": "new"}).read_bytes(), "2024-11-20",
                 "daint", "gh200", "prgenv-gnu", "24.11", ("v1", "latest"),
                 {"env.json": json.dumps(ENV)})
    old = Pulled(build_image(tmp_path / "o.sqfs", {"a": "old"}).read_bytes(), "2024-07-01",
                 "daint", "gh200", "prgenv-gnu", "24.7", ("v1",), {"env.json": "{broken"})
    eiger = Pulled(build_image(tmp_path / "e.sqfs", {"a": "e"}).read_bytes(), "2024-11-21",
                   "eiger", "zen2", "prgenv-gnu", "24.11", ("v1",))
    return make_repository(tmp_path / "repo", [new, old, eiger]), new, old


def test_images_lists_every_label_with_its_fields(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    repo, new, _ = _repo(tmp_path)
    config = tmp_path / "uenvfs.toml"
    config.write_text('images = []\nsystem = "daint"\nuarch = "gh200"\n')
    code, out, err = run(capsys, "images", "--json", "--repo", str(repo), "--config", str(config))
    assert code == exits.OK, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert sorted(rows) == ["prgenv-gnu+24.11+latest", "prgenv-gnu+24.11+v1",
                            "prgenv-gnu+24.7+v1"]
    image = repo / "images" / new.sha256 / "store.squashfs"
    assert rows["prgenv-gnu+24.11+v1"] == {
        "name": "prgenv-gnu+24.11+v1", "image_path": str(image), "size": image.stat().st_size,
        "uenv_name": "prgenv-gnu", "description": "GNU toolchain", "mount": "/user-environment",
        "views": ["default"], "problem": None, "label": "prgenv-gnu/24.11:v1@daint%gh200",
        "sha256": new.sha256, "id": new.sha256[:16], "date": "2024-11-20", "system": "daint",
        "uarch": "gh200"}
    assert rows["prgenv-gnu+24.7+v1"]["problem"].startswith("broken meta/env.json")
    # Without the node's system, every system's records, named with system and uarch.
    config.write_text("images = []\n")
    code, out, _ = run(capsys, "images", "--json", "--repo", str(repo), "--config", str(config))
    assert "prgenv-gnu+24.11+v1+eiger+zen2" in {row["name"] for row in json.loads(out)}


def test_env_and_check_take_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, new, _ = _repo(tmp_path)
    config = tmp_path / "uenvfs.toml"
    config.write_text(f'images = []\nsystem = "daint"\nuarch = "gh200"\n'
                      f'repos = ["{repo}"]\nmountpoint = "/run/pact/uenv"\n')
    code, out, err = run(capsys, "env", "prgenv-gnu/24.11:latest", "--config", str(config))
    assert code == exits.OK, err
    assert out == (f"export PATH=/run/pact/uenv/{new.sha256[:16]}/env/default/bin"
                   '"${PATH:+:$PATH}"\n')
    code, out, err = run(capsys, "check", "prgenv-gnu/24.7", "--config", str(config))
    assert code == exits.OK, err
    assert out.startswith("prgenv-gnu/24.7: ok (")
    code, _, err = run(capsys, "check", "prgenv-gnu", "--config", str(config))
    assert code == exits.FAILED
    assert one_line_error(err).startswith(
        "uenvfs check: prgenv-gnu is ambiguous: it matches 2 images: "
        "prgenv-gnu/24.11:v1@daint%gh200 prgenv-gnu/24.11:latest@daint%gh200 (")
    code, _, err = run(capsys, "env", "prgenv-gnu/25.1", "--config", str(config))
    assert code == exits.FAILED
    assert "no such image (not a name or uenv label" in one_line_error(err)


@pytest.mark.skipif(Path("/images").exists(), reason="needs a node without /images")
def test_a_missing_default_image_directory_holds_no_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A node with a repository and no /images (the built-in default image directory): the
    # repository's images are listed. An image directory named on the command line that is
    # missing is still an error, /images too.
    repo, new, old = _repo(tmp_path)
    config = tmp_path / "uenvfs.toml"
    config.write_text('system = "daint"\nuarch = "gh200"\n')  # no images: the default
    code, out, err = run(capsys, "images", "--json", "--repo", str(repo), "--config", str(config))
    assert (code, err) == (exits.OK, "")
    assert {row["id"] for row in json.loads(out)} == {new.sha256[:16], old.sha256[:16]}
    for named in (tmp_path / "nope", Path("/images")):
        code, _, err = run(capsys, "images", "--repo", str(repo), "--config", str(config),
                           "--images", str(named))
        assert code == exits.FAILED
        assert one_line_error(err) == f"uenvfs images: image directory {named}: not a directory"
