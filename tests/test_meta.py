"""Images read without mounting them: `uenvfs images`, `uenvfs check`, `uenvfs env`, and the
meta/env.json model behind them. Real images built with gensquashfs; no FUSE, no root."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from uenvfs import meta
from uenvfs.cli import EXIT_FAILED, EXIT_OK, main

from .support import build_image

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


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- reading files and meta/env.json -------------------------------------------------------


def test_read_file(images: Path) -> None:
    data = meta.read_file(images / "multi.sqfs", "env/default/bin/tool")
    assert data == b"#!/bin/sh\n"
    with pytest.raises(meta.NotInImage):
        meta.read_file(images / "plain.sqfs", meta.ENV_JSON)
    with pytest.raises(meta.ImageError, match="not a regular file"):
        meta.read_file(images / "multi.sqfs", "env")
    with pytest.raises(meta.ImageError, match="not a SquashFS image"):
        meta.read_file(images / "garbage.sqfs", meta.ENV_JSON)


def test_read_meta(images: Path) -> None:
    uenv = meta.read_meta(images / "multi.sqfs")
    assert (uenv.name, uenv.description, uenv.mount) == ("prgenv", "a test uenv", MOUNT)
    assert list(uenv.views) == ["default", "extra"]
    env = uenv.views["default"].env
    assert env is not None
    assert env.scalars["BOOST_ROOT"] is None
    assert env.lists["CMAKE_PREFIX_PATH"] == (meta.ListOp("unset", ()),
                                              meta.ListOp("prepend", (MOUNT,)))
    assert meta.read_meta(images / "scriptonly.sqfs").views["default"].env is None


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
    with pytest.raises(meta.MetaFormatError, match=complaint):
        meta.parse_meta(document.encode())


def test_scalar_replaces_list_definition() -> None:
    document = {"views": {"v": {"env": {"values": {
        "list": {"X": [{"op": "prepend", "value": ["/a"]}]}, "scalar": {"X": "/b"}}}}}}
    env = meta.parse_meta(json.dumps(document).encode()).views["v"].env
    assert env == meta.Env(lists={}, scalars={"X": "/b"})


# -- uenvfs images -------------------------------------------------------------------------


def test_images_table(capsys: pytest.CaptureFixture[str], images: Path, config: Path) -> None:
    code, out, err = run(capsys, "images", "--images", str(images), "--config", str(config))
    assert (code, err) == (EXIT_OK, "")
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
    assert code == EXIT_OK
    listing = {entry["name"]: entry for entry in json.loads(out)}
    multi = images / "multi.sqfs"
    assert listing["multi"] == {
        "name": "multi", "image_path": str(multi), "size": multi.stat().st_size,
        "uenv_name": "prgenv", "description": "a test uenv", "mount": MOUNT,
        "views": ["default", "extra"], "problem": None,
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
    assert code == EXIT_OK
    listing = {entry["name"]: entry["image_path"] for entry in json.loads(out)}
    assert listing["multi"] == str(images / "multi.sqfs")
    assert listing["extra"] == str(other / "extra.sqfs")


def test_images_from_config_file(capsys: pytest.CaptureFixture[str], images: Path,
                                 tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(f'images = "{images}"\n')
    code, out, _ = run(capsys, "images", "--json", "--config", str(config))
    assert code == EXIT_OK
    assert "multi" in {entry["name"] for entry in json.loads(out)}


def test_images_empty_and_missing_directory(capsys: pytest.CaptureFixture[str], config: Path,
                                            tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert run(capsys, "images", "--images", str(tmp_path / "empty"), "--config",
               str(config)) == (EXIT_OK, "no images\n", "")
    code, _, err = run(capsys, "images", "--images", str(tmp_path / "nope"), "--config",
                       str(config))
    assert code == EXIT_FAILED
    assert "not a directory" in one_line_error(err)


# -- uenvfs check --------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """An image of 203 inodes (root, 2 directories, 200 files) with compressed metadata."""
    files = {f"dir{i % 2}/file{i:03d}": f"content {i}\n" * 10 for i in range(200)}
    return build_image(tmp_path / "good.sqfs", files)


def damaged(good: Path, name: str, change: Any) -> Path:
    data = bytearray(good.read_bytes())
    path = good.with_name(name)
    path.write_bytes(change(data))
    return path


def check(capsys: pytest.CaptureFixture[str], image: Path) -> tuple[int, str, str]:
    return run(capsys, "check", str(image))


def test_check_good(capsys: pytest.CaptureFixture[str], good: Path) -> None:
    code, out, err = check(capsys, good)
    assert (code, err) == (EXIT_OK, "")
    assert out.startswith(f"{good}: ok (203 inodes, ")
    assert meta.check_image(good) is None


def test_check_accepts_an_image_cut_after_its_used_bytes(capsys: pytest.CaptureFixture[str],
                                                         good: Path) -> None:
    used = meta.read_superblock(good).bytes_used
    assert used < good.stat().st_size  # gensquashfs pads to a multiple of 4 KiB
    exact = damaged(good, "exact.sqfs", lambda data: data[:used])
    assert check(capsys, exact)[0] == EXIT_OK


def _corrupt_inode_table(data: bytearray) -> bytearray:
    (inode_table,) = struct.unpack_from("<Q", data, 64)
    (header,) = struct.unpack_from("<H", data, inode_table)
    assert not header & 0x8000, "the first inode metadata block should be compressed"
    middle = inode_table + 2 + (header & 0x7FFF) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0x5A
    return data


@pytest.mark.parametrize(("name", "change", "reason"), [
    ("truncated", lambda data: data[: len(data) // 2], "truncated: the file has"),
    ("random", lambda data: os.urandom(len(data)), "not a SquashFS image (wrong magic number"),
    ("magic", lambda data: b"\0\1\2\3" + data[4:], "wrong magic number 00010203"),
    ("empty", lambda data: b"", "too short for a SquashFS superblock (0 bytes)"),
    ("metadata", _corrupt_inode_table, "corrupt"),
])
def test_check_bad(capsys: pytest.CaptureFixture[str], good: Path, name: str, change: Any,
                   reason: str) -> None:
    bad = damaged(good, f"{name}.sqfs", change)
    code, out, err = check(capsys, bad)
    assert (code, out) == (EXIT_FAILED, "")
    assert one_line_error(err).startswith(f"uenvfs check: {bad}: ")
    assert reason in err
    assert meta.check_image(bad) is not None


def test_check_tool_alone_detects_damage(good: Path) -> None:
    """What the daemon runs (the command and check_result, without the superblock
    pre-check) catches every kind of damage too."""
    for name, change in [("t", lambda d: d[: len(d) // 2]), ("m", lambda d: b"XXXX" + d[4:]),
                         ("e", lambda d: b""), ("c", _corrupt_inode_table)]:
        bad = damaged(good, f"{name}.sqfs", change)
        result = subprocess.run(meta.check_command(bad), capture_output=True, text=True,
                                check=False, timeout=60)
        assert meta.check_result(result.returncode, result.stdout, result.stderr), name
    result = subprocess.run(meta.check_command(good), capture_output=True, text=True,
                            check=False, timeout=60)
    assert meta.check_result(result.returncode, result.stdout, result.stderr) is None


def test_check_missing_and_unknown(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = check(capsys, tmp_path / "nope.sqfs")
    assert code == EXIT_FAILED
    assert one_line_error(err) == f"uenvfs check: {tmp_path / 'nope.sqfs'}: no such image file"


def test_check_command_and_result() -> None:
    assert meta.check_command(Path("/images/a.sqfs")) == ["rdsquashfs", "-d", "/images/a.sqfs"]
    assert meta.check_command(Path("-odd.sqfs")) == ["rdsquashfs", "-d", "./-odd.sqfs"]
    assert meta.check_result(0, "dir x 0755 0 0\n", "") is None
    assert meta.check_result(
        1, "", "/i/a: b.sqfs: reading super block: wrong magic value in super block.\n"
    ) == "not a SquashFS image (wrong magic number)"
    assert meta.check_result(
        1, "", "x.sqfs: loading ID table: location out of bounds.\n"
    ) == "truncated or corrupt: loading ID table: location out of bounds"
    assert meta.check_result(
        1, "", "x.sqfs: reading filesystem tree: internal compressor error.\n"
    ) == "corrupt metadata: reading filesystem tree: internal compressor error"
    assert meta.check_result(1, "", "/x.sqfs: Permission denied\n") == "Permission denied"
    assert meta.check_result(1, "", "") == "no reason given"
    assert meta.check_result(-9, "", "") == "rdsquashfs killed by signal 9"


def test_superblock_problem(good: Path) -> None:
    header = good.read_bytes()[: meta.SUPERBLOCK_SIZE]
    assert meta.superblock_problem(header, good.stat().st_size) is None
    assert "truncated" in str(meta.superblock_problem(header, 100))
    superblock = meta.parse_superblock(header)
    assert (superblock.inodes, superblock.compressor, superblock.version) == (203, "gzip", (4, 0))
    old = header[:28] + struct.pack("<HH", 3, 1) + header[32:]
    assert "unsupported SquashFS version 3.1" in str(meta.superblock_problem(old, 1 << 20))


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
    assert (code, err) == (EXIT_OK, ""), err
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
    assert code == EXIT_OK
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
    assert (code, out) == (EXIT_FAILED, "")
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
    out = subprocess.run(["bash", "-c", f"printf %s {meta.shell_word(value)}"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out == value


def test_shell_word_expands_view_variables() -> None:
    word = meta.shell_word("${@A@}/x:${@B@}")
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
    assert meta.rewrite_paths(value, "/user-environment/", "/t") == expected
    assert meta.rewrite_paths(value, None, "/t") == value
    assert meta.rewrite_paths(value, "/", "/t") == value
