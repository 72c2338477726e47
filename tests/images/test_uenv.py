"""uenv images read without mounting them: the meta/env.json model, `uenvfs images` and
`uenvfs env`. Real images built with gensquashfs; no FUSE, no root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from uenvfs.client import exits
from uenvfs.image import uenv

from ..support import build_image
from .cli_support import one_line_error, run

pytestmark = pytest.mark.skipif(
    shutil.which("gensquashfs") is None or shutil.which("rdsquashfs") is None,
    reason="needs gensquashfs and rdsquashfs (squashfs-tools-ng)",
)

MOUNT = "/user-environment"

# A view with list operations of every kind, null scalars and ${@VAR@} references.
DEFAULT_VIEW: dict[str, Any] = {
    "description": "the default view",
    "root": f"{MOUNT}/env/default",
    "env": {
        "version": 1,
        "values": {
            "list": {
                "PATH": [{"op": "prepend",
                          "value": [f"{MOUNT}/env/default/bin", f"{MOUNT}/bin"]}],
                "LD_LIBRARY_PATH": [{"op": "append", "value": [f"{MOUNT}/lib"]}],
                "MANPATH": [{"op": "prepend", "value": [f"{MOUNT}/man"]}],
                "PKG_CONFIG_PATH": [{"op": "set", "value": [f"{MOUNT}/a", "/opt/x"]}],
                "PYTHONPATH": [{"op": "unset", "value": []}],
                "CMAKE_PREFIX_PATH": [{"op": "unset", "value": []},
                                      {"op": "prepend", "value": [MOUNT]}],
                "ACLOCAL_PATH": [{"op": "set", "value": [f"{MOUNT}/share/aclocal"]},
                                 {"op": "append", "value": ["/usr/share/aclocal"]},
                                 {"op": "prepend", "value": ["/first"]}],
                "CPATH": [{"op": "append", "value": ["${@SCRATCH@}/include"]}],
            },
            "scalar": {
                "CUDA_HOME": f"{MOUNT}/env/default",
                "BOOST_ROOT": None,
                "NEVER_SET": None,
                "WEIRD": "it's a \"quoted\" $value `cmd` * ; with  spaces\nand a newline",
                "MPICC": f"{MOUNT}-other/bin/mpicc",
                "PREFIXES": f"{MOUNT}/a:{MOUNT}/b:/c",
                "WORK": "${@SCRATCH@}/work",
            },
        },
    },
    "type": "spack-view",
}

EXTRA_VIEW: dict[str, Any] = {
    "description": "another view",
    "env": {"version": 1, "values": {
        "list": {"PATH": [{"op": "append", "value": [f"{MOUNT}/extra/bin"]}]},
        "scalar": {}}},
}


def env_json(views: Mapping[str, Any], mount: str | None = MOUNT, **top: Any) -> str:
    document: dict[str, Any] = {"name": "prgenv", "description": "a test uenv",
                                "views": dict(views), **top}
    if mount is not None:
        document["mount"] = mount
    return json.dumps(document, indent=1)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """An empty configuration file: a /etc/uenvfs.toml on this machine cannot change a test."""
    path = tmp_path / "uenvfs.toml"
    path.write_text("")
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """An image directory with every kind of image `uenvfs images` has to list."""
    directory = tmp_path / "images"
    build_image(directory / "multi.sqfs", {
        "meta/env.json": env_json({"default": DEFAULT_VIEW, "extra": EXTRA_VIEW}),
        "env/default/bin/tool": "#!/bin/sh\n",
    })
    build_image(directory / "single.sqfs", {
        "meta/env.json": env_json({"tools": EXTRA_VIEW}, description=None),
    })
    build_image(directory / "twoviews.squashfs", {
        "meta/env.json": env_json({"a": EXTRA_VIEW, "b": EXTRA_VIEW}),
    })
    build_image(directory / "nomount.sqfs", {
        "meta/env.json": env_json({"default": DEFAULT_VIEW}, mount=None),
    })
    build_image(directory / "scriptonly.sqfs", {
        "meta/env.json": env_json({"default": {"activate": f"{MOUNT}/env/default/activate.sh",
                                               "description": "old style"}}),
    })
    build_image(directory / "plain.sqfs", {"bin/hello": "hello\n"})
    build_image(directory / "broken.sqfs", {"meta/env.json": '{"name": "broken", "views": {'})
    (directory / "garbage.sqfs").write_bytes(os.urandom(64 * 1024))
    (directory / "README").write_text("not an image\n")
    return directory


# -- meta/env.json ------------------------------------------------------------------------


async def test_read_meta(images: Path) -> None:
    meta = await uenv.read_meta(images / "multi.sqfs")
    assert (meta.name, meta.description, meta.mount) == ("prgenv", "a test uenv", MOUNT)
    assert list(meta.views) == ["default", "extra"]
    env = meta.views["default"].env
    assert env is not None
    assert env.scalars["BOOST_ROOT"] is None
    assert env.lists["CMAKE_PREFIX_PATH"] == (uenv.ListOp("unset", ()),
                                              uenv.ListOp("prepend", (MOUNT,)))
    assert (await uenv.read_meta(images / "scriptonly.sqfs")).views["default"].env is None


@pytest.mark.parametrize(("document", "complaint"), [
    ("[]", "top level: expected an object"),
    ('{"views": []}', "views: expected an object"),
    ('{"views": {"v": {"env": {"version": 2}}}}', "version: 2 is not supported"),
    ('{"views": {"v": {"env": {"values": {"list": {"PATH": [{"op": "frob", "value": []}]}}}}}}',
     r"PATH\[0\]\.op: 'frob' is not one of"),
    ('{"views": {"v": {"env": {"values": {"list": {"PATH": [{"op": "set", "value": "/x"}]}}}}}}',
     "expected a list of strings"),
    ('{"views": {"v": {"env": {"values": {"list": {"PATH": {"op": "set"}}}}}}}',
     "expected a list of operations"),
    ('{"views": {"v": {"env": {"values": {"scalar": {"A-B": "x"}}}}}}',
     "'A-B' is not a valid variable name"),
    ('{"views": {"v": {"env": {"values": {"scalar": {"N": 3}}}}}}', "expected a string"),
    ('{"views": {"v": {"env": {"values": {"list": {"X;rm": []}}}}}}', "not a valid variable"),
    ("{", "not valid JSON"),
])
def test_parse_meta_rejects(document: str, complaint: str) -> None:
    with pytest.raises(uenv.MetaFormatError, match=complaint):
        uenv.parse_meta(document.encode())


def test_scalar_replaces_list_definition() -> None:
    document = {"views": {"v": {"env": {"values": {
        "list": {"X": [{"op": "prepend", "value": ["/a"]}]}, "scalar": {"X": "/b"}}}}}}
    env = uenv.parse_meta(json.dumps(document).encode()).views["v"].env
    assert env == uenv.Env(lists={}, scalars={"X": "/b"})


# -- uenvfs images -------------------------------------------------------------------------


def test_images_table(capsys: pytest.CaptureFixture[str], images: Path, config: Path) -> None:
    code, out, err = run(capsys, "images", "--images", str(images), "--config", str(config))
    assert (code, err) == (exits.OK, "")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "UENV", "VIEWS", "IMAGE", "DESCRIPTION"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["broken", "garbage", "multi", "nomount", "plain", "scriptonly",
                            "single", "twoviews"]
    # SIZE is two words ("4.0 KiB")
    assert rows["multi"].split()[3:6] == ["prgenv", "default,extra", str(images / "multi.sqfs")]
    assert rows["multi"].endswith("a test uenv")
    assert rows["twoviews"].split()[5] == str(images / "twoviews.squashfs")
    assert rows["plain"].endswith("(no meta/env.json)")
    assert "(broken meta/env.json: not valid JSON" in rows["broken"]
    assert "(cannot read the image: not a SquashFS image" in rows["garbage"]


def test_images_json(capsys: pytest.CaptureFixture[str], images: Path, config: Path) -> None:
    code, out, _ = run(capsys, "images", "--json", "--images", str(images),
                       "--config", str(config))
    assert code == exits.OK
    listing = {entry["name"]: entry for entry in json.loads(out)}
    multi = images / "multi.sqfs"
    assert listing["multi"] == {
        "name": "multi", "image_path": str(multi), "size": multi.stat().st_size,
        "uenv_name": "prgenv", "description": "a test uenv", "mount": MOUNT,
        "views": ["default", "extra"], "problem": None,
        # the fields of a uenv repository's labels: none for an image directory's image
        "label": None, "sha256": None, "id": None, "date": None, "system": None, "uarch": None,
    }
    assert listing["single"]["description"] is None
    assert listing["single"]["views"] == ["tools"]
    assert listing["plain"]["problem"] == "no meta/env.json"
    assert listing["plain"]["uenv_name"] is None
    assert listing["plain"]["views"] == []
    assert listing["broken"]["problem"].startswith("broken meta/env.json: not valid JSON")
    assert listing["garbage"]["size"] == 64 * 1024
    assert "not a SquashFS image" in listing["garbage"]["problem"]


def test_images_several_directories(capsys: pytest.CaptureFixture[str], images: Path,
                                    config: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    build_image(other / "multi.sqfs", {"x": "shadowed by the first directory"})
    build_image(other / "extra.sqfs", {"x": "y"})
    code, out, _ = run(capsys, "images", "--json", "--images", str(images), "--images",
                       str(other), "--config", str(config))
    assert code == exits.OK
    listing = {entry["name"]: entry["image_path"] for entry in json.loads(out)}
    assert listing["multi"] == str(images / "multi.sqfs")
    assert listing["extra"] == str(other / "extra.sqfs")


def test_images_from_config_file(capsys: pytest.CaptureFixture[str], images: Path,
                                 tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(f'images = "{images}"\n')
    code, out, _ = run(capsys, "images", "--json", "--config", str(config))
    assert code == exits.OK
    assert "multi" in {entry["name"] for entry in json.loads(out)}


def test_images_empty_and_missing_directory(capsys: pytest.CaptureFixture[str], config: Path,
                                            tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert run(capsys, "images", "--images", str(tmp_path / "empty"), "--config",
               str(config)) == (exits.OK, "no images\n", "")
    code, _, err = run(capsys, "images", "--images", str(tmp_path / "nope"), "--config",
                       str(config))
    assert code == exits.FAILED
    assert "not a directory" in one_line_error(err)


# -- uenvfs env ----------------------------------------------------------------------------

# Variables that a shell sets by itself.
SHELL_OWN = {"PWD", "SHLVL", "_", "OLDPWD"}


def apply(lines: str, start: Mapping[str, str], shell: str = "bash") -> dict[str, str]:
    """The environment that results from running *lines* in *shell* started with *start*."""
    result = subprocess.run([shell, "-c", f"{lines}\n/usr/bin/env -0"], env=dict(start),
                            capture_output=True, check=True, timeout=60)
    assert result.stderr == b""
    pairs = [entry.split("=", 1) for entry in result.stdout.decode().split("\0") if entry]
    return {k: v for k, v in pairs if k not in SHELL_OWN}


def env_lines(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, "env", *argv)
    assert (code, err) == (exits.OK, ""), err
    return out


WEIRD = DEFAULT_VIEW["env"]["values"]["scalar"]["WEIRD"]


def expected_default(served: str, start: Mapping[str, str]) -> dict[str, str]:
    """What the default view of "multi" does to *start* when served at *served*."""
    def joined(*parts: str | None) -> str:
        return ":".join(p for p in parts if p)

    result = {k: v for k, v in start.items() if k not in ("PYTHONPATH", "BOOST_ROOT")}
    result.update({
        "PATH": joined(f"{served}/env/default/bin", f"{served}/bin", start.get("PATH")),
        "LD_LIBRARY_PATH": joined(start.get("LD_LIBRARY_PATH"), f"{served}/lib"),
        "MANPATH": joined(f"{served}/man", start.get("MANPATH")),
        "PKG_CONFIG_PATH": f"{served}/a:/opt/x",
        "CMAKE_PREFIX_PATH": served,
        "ACLOCAL_PATH": f"/first:{served}/share/aclocal:/usr/share/aclocal",
        "CPATH": joined(start.get("CPATH"), f"{start.get('SCRATCH', '')}/include"),
        "CUDA_HOME": f"{served}/env/default",
        "WEIRD": WEIRD,
        "MPICC": f"{MOUNT}-other/bin/mpicc",
        "PREFIXES": f"{served}/a:{served}/b:/c",
        "WORK": f"{start.get('SCRATCH', '')}/work",
    })
    return result


STARTS = {
    "set": {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/old/lib", "MANPATH": "/old/man",
            "PYTHONPATH": "/old/py", "BOOST_ROOT": "/old/boost", "CMAKE_PREFIX_PATH": "/old",
            "PKG_CONFIG_PATH": "/old/pc", "SCRATCH": "/scratch/u", "HOME": "/home/u"},
    "bare": {"PATH": "/usr/bin:/bin"},
    "empty": {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "", "MANPATH": "", "CPATH": ""},
}


@pytest.mark.parametrize("shell", ["bash", "sh"])
@pytest.mark.parametrize("start", sorted(STARTS))
def test_env_applies_the_view(capsys: pytest.CaptureFixture[str], images: Path, config: Path,
                              tmp_path: Path, start: str, shell: str) -> None:
    mountpoint = tmp_path / "uenv"
    lines = env_lines(capsys, "multi", "--images", str(images), "--config", str(config),
                      "--mountpoint", str(mountpoint))
    result = apply(lines, STARTS[start], shell)
    assert result == expected_default(f"{mountpoint}/multi", STARTS[start])


def test_env_lines(capsys: pytest.CaptureFixture[str], images: Path, config: Path) -> None:
    """The lines themselves: readable, in uenv's order (scalars, then lists), default
    mountpoint /run/pact/uenv."""
    lines = env_lines(capsys, "multi", "--images", str(images), "--config", str(config))
    served = "/run/pact/uenv/multi"
    assert lines.splitlines()[:2] == [f"export CUDA_HOME={served}/env/default",
                                      "unset BOOST_ROOT"]
    assert f'export PATH={served}/env/default/bin:{served}/bin"${{PATH:+:$PATH}}"' in lines
    assert f'export LD_LIBRARY_PATH="${{LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}}"{served}/lib' in lines
    assert lines.index("unset CMAKE_PREFIX_PATH") < lines.index("export CMAKE_PREFIX_PATH")
    assert "unset PYTHONPATH\n" in lines


def test_env_other_view_and_path_argument(capsys: pytest.CaptureFixture[str], images: Path,
                                          config: Path) -> None:
    lines = env_lines(capsys, str(images / "multi.sqfs"), "--view", "extra", "--config",
                      str(config), "--mountpoint", "/srv/uenv")
    assert lines == 'export PATH="${PATH:+$PATH:}"/srv/uenv/multi/extra/bin\n'
    assert apply(lines, {"PATH": "/bin"}) == {"PATH": "/bin:/srv/uenv/multi/extra/bin"}


def test_env_only_view_is_the_default(capsys: pytest.CaptureFixture[str], images: Path,
                                      config: Path) -> None:
    lines = env_lines(capsys, "single", "--images", str(images), "--config", str(config))
    assert lines == 'export PATH="${PATH:+$PATH:}"/run/pact/uenv/single/extra/bin\n'


def test_env_without_mount_field(capsys: pytest.CaptureFixture[str], images: Path,
                                 config: Path) -> None:
    code, out, err = run(capsys, "env", "nomount", "--images", str(images), "--config",
                         str(config))
    assert code == exits.OK
    assert "names no mount point" in one_line_error(err)
    assert f"export CUDA_HOME={MOUNT}/env/default\n" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["twoviews"], "several views and none named 'default': choose one with --view (a, b)"),
    (["multi", "--view", "nope"], "no view 'nope' (views: default, extra)"),
    (["plain"], "has no meta/env.json"),
    (["broken"], "meta/env.json: not valid JSON"),
    (["garbage"], "cannot read the image: not a SquashFS image"),
    (["scriptonly"], "has no env section"),
    (["unknown"], "unknown: no such image"),
    (["../multi"], "../multi: no such image file"),
])
def test_env_errors(capsys: pytest.CaptureFixture[str], images: Path, config: Path,
                    argv: list[str], message: str) -> None:
    code, out, err = run(capsys, "env", *argv, "--images", str(images), "--config", str(config))
    assert (code, out) == (exits.FAILED, "")
    line = one_line_error(err)
    assert line.startswith("uenvfs env: ")
    assert message in line


def test_env_name_from_a_program_map(capsys: pytest.CaptureFixture[str], images: Path,
                                     tmp_path: Path) -> None:
    program = tmp_path / "lookup"
    program.write_text(f'#!/bin/sh\n[ "$1" = remote ] && echo {images / "single.sqfs"}\n')
    program.chmod(0o755)
    config = tmp_path / "map.toml"
    config.write_text(f'images = []\nprogram_map = "{program}"\n')
    lines = env_lines(capsys, "remote", "--config", str(config))
    assert lines == 'export PATH="${PATH:+$PATH:}"/run/pact/uenv/remote/extra/bin\n'


# -- shell words ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "plain", "a b", "it's", '"$HOME" `x` \\ \n ;|&*?[]~',
                                   "${@", "@}", "${@not valid@}", "-n"])
def test_shell_word_round_trip(value: str) -> None:
    out = subprocess.run(["bash", "-c", f"printf %s {uenv.shell_word(value)}"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out == value


def test_shell_word_expands_view_variables() -> None:
    word = uenv.shell_word("${@A@}/x:${@B@}")
    out = subprocess.run(["sh", "-c", f"printf %s {word}"], env={"A": "/a b"},
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out == "/a b/x:"


@pytest.mark.parametrize(("value", "expected"), [
    ("/user-environment", "/t"),
    ("/user-environment/bin", "/t/bin"),
    ("/user-environmentx/bin", "/user-environmentx/bin"),
    ("/usr/bin:/user-environment/lib:/opt", "/usr/bin:/t/lib:/opt"),
    ("relative/user-environment", "relative/user-environment"),
])
def test_rewrite_paths(value: str, expected: str) -> None:
    assert uenv.rewrite_paths(value, "/user-environment/", "/t") == expected
    assert uenv.rewrite_paths(value, None, "/t") == value
    assert uenv.rewrite_paths(value, "/", "/t") == value
