"""The pure part of `uenvfs run`: the command line's words, mount points, views and the
environment (as uenv makes it); and the mount table's image binds and uenv's own mounts. The
shell lines of `uenvfs env` do in a real shell what their model here says."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uenvfs.client import session
from uenvfs.client.mounted import foreign_here
from uenvfs.client.session import ImageSpec, Placement, SessionError, ViewSpec
from uenvfs.image.uenv import Env, ListOp, Meta, View, apply_views, expand, shell_lines
from uenvfs.kernel import mountinfo, namespace


def test_image_words() -> None:
    assert session.parse_images("a") == [ImageSpec("a", None)]
    assert session.parse_images("a:/x/,b:/user-tools") == [ImageSpec("a", "/x"),
                                                           ImageSpec("b", "/user-tools")]
    # A uenv label has ':' before its tag: the mount point starts at the last ":/".
    assert session.parse_images("prgenv/24.11:v1@daint:/opt//env") == [
        ImageSpec("prgenv/24.11:v1@daint", "/opt/env")]
    assert session.parse_images("prgenv/24.11:v1") == [ImageSpec("prgenv/24.11:v1", None)]
    for bad in ("", "a,,b", ",a", "a,"):
        with pytest.raises(SessionError):
            session.parse_images(bad)


def test_view_words() -> None:
    assert session.parse_views(None) == []
    assert session.parse_views("default,tools:dev") == [ViewSpec(None, "default"),
                                                        ViewSpec("tools", "dev")]
    with pytest.raises(SessionError, match="names no view"):
        session.parse_views("tools:")


def _meta(name: str | None, mount: str | None, *views: str, env: Env | None = None) -> Meta:
    return Meta(name, None, mount, {v: View(v, "", env or Env()) for v in views})


def _image(name: str, mount: str, meta: Meta | None = None) -> Placement:
    return Placement(name, mount, meta, f"/images/{name}.sqfs")


def test_mount_point_choice() -> None:
    meta = _meta("x", "/opt/x/")
    assert session.mount_point(ImageSpec("x", "/here"), meta) == "/here"
    assert session.mount_point(ImageSpec("x", None), meta) == "/opt/x"
    assert session.mount_point(ImageSpec("x", None), _meta("x", None)) == "/user-environment"
    assert session.mount_point(ImageSpec("x", None), None) == "/user-environment"


def test_mount_checks() -> None:
    a, b = _image("a", "/user-environment"), _image("b", "/user-tools")
    assert session.check_mounts([a, b], "/run/pact/uenv", {}) == [a, b]
    # What an enclosing session already put there is not bound again.
    assert session.check_mounts([a, b], "/run/pact/uenv", {"/user-environment": "a"}) == [b]
    refused = {
        "both want mount point /user-environment": [a, _image("b", "/user-environment")],
        "are inside one another": [a, _image("b", "/user-environment/sub")],
        "would hide uenvfs": [_image("a", "/run/pact/uenv/x")],
        "must be an absolute path other than /": [_image("a", "/")],
    }
    for message, images in refused.items():
        with pytest.raises(SessionError, match=message):
            session.check_mounts(images, "/run/pact/uenv", {})
    with pytest.raises(SessionError, match=re.escape("already holds image a (from an enclosing")):
        session.check_mounts([_image("b", "/user-environment")], "/run/pact/uenv",
                             {"/user-environment": "a"})
    with pytest.raises(SessionError, match="would hide uenvfs"):
        session.check_mounts([_image("a", "/run")], "/run/pact/uenv", {})


def test_view_choice() -> None:
    a = _image("a", "/ue", _meta("prgenv", "/ue", "default", "dev"))
    b = _image("b", "/ut", _meta(None, "/ut", "default", "tools"))
    c = _image("c", "/uc")
    assert [(i.name, v.name) for i, v in session.choose_views(
        [a, b], [ViewSpec(None, "tools"), ViewSpec("prgenv", "default"),
                 ViewSpec("b", "default")])] == [("b", "tools"), ("a", "default"),
                                                 ("b", "default")]
    with pytest.raises(SessionError, match=re.escape("'default' is in several images (a, b): say")):
        session.choose_views([a, b], [ViewSpec(None, "default")])
    with pytest.raises(SessionError, match=re.escape(
            "no view 'x': a has default, dev; b has default, tools; c has no meta/env.json")):
        session.choose_views([a, b, c], [ViewSpec(None, "x")])
    with pytest.raises(SessionError, match=re.escape("z is not one of the session's images (a")):
        session.choose_views([a, b], [ViewSpec("z", "default")])
    old = _image("o", "/uo", Meta("o", None, "/uo", {"v": View("v", "", None)}))
    with pytest.raises(SessionError, match="only has an activation script"):
        session.choose_views([old], [ViewSpec(None, "v")])


def test_environment_of_a_session() -> None:
    env = Env(lists={"PATH": (ListOp("prepend", ("/ue/bin",)),)}, scalars={"X_HOME": "/ue"})
    a = _image("a", "/ue", _meta("prgenv", "/ue", "default", env=env))
    b = _image("b", "/ut")
    outer = {"PATH": "/bin", "UENV_MOUNT_LIST": "/old.sqfs:/ut,/keep.sqfs:/uk",
             "UENV_VIEW": "/uk:keep:v"}
    got = session.environment(outer, [a, b], session.choose_views([a], [ViewSpec(None,
                                                                                 "default")]))
    assert got == {"PATH": "/ue/bin:/bin", "X_HOME": "/ue",
                   "UENV_MOUNT_LIST": "/keep.sqfs:/uk,/images/a.sqfs:/ue,/images/b.sqfs:/ut",
                   "UENV_VIEW": "/uk:keep:v,/ue:prgenv:default"}
    # No view: UENV_VIEW is set, empty, as uenv sets it (uenv's "in a session" needs both).
    assert session.environment({}, [b], []) == {"UENV_MOUNT_LIST": "/images/b.sqfs:/ut",
                                                "UENV_VIEW": ""}
    # An entry for the mount point with another image file (stale, no mount there): replaced,
    # and the views it had there go with it; the same image file keeps them.
    stale = {"UENV_MOUNT_LIST": "/old.sqfs:/ut", "UENV_VIEW": "/ut:old:v,/uk:keep:v"}
    assert session.environment(stale, [b], [])["UENV_VIEW"] == "/uk:keep:v"
    same = {"UENV_MOUNT_LIST": "/images/b.sqfs:/ut", "UENV_VIEW": "/ut:b:v"}
    assert session.environment(same, [b], [])["UENV_VIEW"] == "/ut:b:v"


def _list(*ops: tuple[str, tuple[str, ...]]) -> tuple[ListOp, ...]:
    return tuple(ListOp(op, values) for op, values in ops)


def test_views_applied_as_uenv_applies_them() -> None:
    """uenv (env.cpp, envvars.cpp): the views merged, every scalar first, then each list
    variable's operations, empty and repeated entries dropped (the first one stays)."""
    app = Env(lists={"PATH": _list(("prepend", ("/user-environment/env/app/bin",)))})
    environ = {"PATH": "/usr/bin:/x/bin:/usr/bin::/bin"}
    assert apply_views([app], environ) == {
        "PATH": "/user-environment/env/app/bin:/usr/bin:/x/bin:/bin"}
    again = Env(lists={"PATH": _list(("append", ("/usr/bin", "/y")))})
    assert apply_views([app, again], environ)["PATH"] == (
        "/user-environment/env/app/bin:/usr/bin:/x/bin:/bin:/y")
    # A later view's scalar reads the environment before any list operation of any view.
    seen = Env(scalars={"SEEN": "${@PATH@}", "WOMBAT": "soup for ${@USER@}"})
    got = apply_views([app, seen], {"PATH": "/bin", "USER": "bob"})
    assert (got["SEEN"], got["WOMBAT"], got["PATH"]) == (
        "/bin", "soup for bob", "/user-environment/env/app/bin:/bin")
    # A later view's scalar replaces an earlier one's; a null one unsets.
    assert apply_views([Env(scalars={"A": "1", "B": "x"}), Env(scalars={"A": "2", "B": None})],
                       {"B": "old"}) == {"A": "2"}
    # unset last: the variable goes; an operation after it starts a new list.
    assert apply_views([Env(lists={"L": _list(("unset", ()))})], {"L": "/a"}) == {}
    assert apply_views([Env(lists={"L": _list(("unset", ()), ("append", ("/b",)))})],
                       {"L": "/a"}) == {"L": "/b"}
    assert apply_views([Env(lists={"L": _list(("prepend", ()))})], {}) == {"L": ""}
    # ${@NAME@} is expanded in the joined list; unset or invalid names expand to nothing, an
    # unterminated one drops the rest.
    assert apply_views([Env(lists={"L": _list(("set", ("${@H@}/bin", "${@1x@}/z", "/q${@H")))})],
                       {"H": "/h"}) == {"H": "/h", "L": "/h/bin:/z:/q"}
    assert expand("a${@NOPE@}b", {}) == "ab"


def test_paths_uenv_cannot_read_are_refused() -> None:
    plus = Placement("pe+cuda", "/user-environment", None, "/images/pe+cuda.sqfs")
    with pytest.raises(SessionError, match=re.escape(
            "pe+cuda: its image file /images/pe+cuda.sqfs cannot be given to the command in "
            "UENV_MOUNT_LIST: uenv reads only letters, digits and _ . / - in a path there, "
            "not '+'")):
        session.check_mounts([plus], "/run/pact/uenv", {})
    with pytest.raises(SessionError, match="its mount point /my env cannot be given"):
        session.check_mounts([_image("a", "/my env")], "/run/pact/uenv", {})


def test_a_mount_of_uenv_is_refused() -> None:
    a = _image("a", "/user-environment")
    foreign = {"/user-environment": "a squashfs mount of /dev/loop3"}
    with pytest.raises(SessionError, match=re.escape(
            "/user-environment already holds a squashfs mount of /dev/loop3, which uenvfs did "
            "not put there: a uenv session")):
        session.check_mounts([a], "/run/pact/uenv", {}, foreign)
    # Ours (an enclosing uenvfs session's) is no uenv mount.
    assert session.check_mounts([a], "/run/pact/uenv", {"/user-environment": "a"}, foreign) == []


MOUNTINFO = rb"""22 1 254:0 / / rw - ext4 /dev/vda rw
60 22 0:40 / /run/pact/uenv rw,nosuid - fuse.uenvfs uenvfs rw
61 22 0:40 /acc /user-environment rw,nosuid - fuse.uenvfs uenvfs rw
62 22 0:40 /acc/bin /opt/bin rw,nosuid - fuse.uenvfs uenvfs rw
63 22 0:41 /other /user-tools rw,nosuid - fuse.uenvfs uenvfs rw
64 22 0:40 /tools /with\040space rw,nosuid - fuse.uenvfs uenvfs rw
65 22 0:40 /tools /user-tools rw,nosuid - fuse.uenvfs uenvfs rw
66 22 0:40 /gone /hidden rw,nosuid - fuse.uenvfs uenvfs rw
67 22 0:50 / /hidden rw - tmpfs tmpfs rw
"""


def test_bound_images_from_the_mount_table() -> None:
    dev = os.makedev(0, 40)
    entries = mountinfo.parse(MOUNTINFO)
    assert [(b.name, b.mount_point) for b in namespace.bound_images(entries, dev)] == [
        ("acc", "/user-environment"), ("tools", "/with space"), ("tools", "/user-tools")]
    assert len(namespace.bound_images(entries)) == 3
    assert namespace.bound_images(mountinfo.parse(b"garbage\n\n1 2 3")) == []


KERNEL_MOUNTINFO = rb"""22 1 254:0 / / rw - ext4 /dev/vda rw
60 22 0:40 / /run/pact/uenv rw,nosuid - fuse.uenvfs uenvfs rw
70 22 7:3 / /run/pact/uenvfs/mnt/acc ro,nosuid,nodev - squashfs /dev/loop3 ro
71 22 7:4 / /run/pact/uenvfs/mnt/tools ro,nosuid,nodev - squashfs /dev/loop4 ro
72 22 7:3 / /user-environment ro,nosuid,nodev - squashfs /dev/loop3 ro
73 22 7:4 /bin /opt/bin ro,nosuid,nodev - squashfs /dev/loop4 ro
74 22 7:9 / /user-tools ro - squashfs /dev/loop9 ro
75 22 0:40 /tools /user-tools rw,nosuid - fuse.uenvfs uenvfs rw
"""


def test_kernel_binds_from_the_mount_table() -> None:
    """A backing mount bound elsewhere, whole; not the copy at its own path, which every
    namespace made from the host has, nor a part of it, nor another squashfs."""
    trees = {os.makedev(7, 3): ("acc", "/run/pact/uenvfs/mnt/acc"),
             os.makedev(7, 4): ("tools", "/run/pact/uenvfs/mnt/tools")}
    entries = mountinfo.parse(KERNEL_MOUNTINFO)
    found = namespace.bound_images(entries, os.makedev(0, 40), trees)
    assert [(b.name, b.mount_point, b.device) for b in found] == [
        ("acc", "/user-environment", os.makedev(7, 3)),
        ("tools", "/user-tools", os.makedev(0, 40))]
    assert [b.name for b in namespace.bound_images(entries, os.makedev(0, 40))] == ["tools"]


# -- a view applied in Python is what its shell lines do in a shell ---------------------------

_names = st.sampled_from(["PLIST", "LIBS", "HOME_X", "EMPTY"])  # not PATH: sh has its own
_values = st.lists(st.sampled_from(["/a", "/b c", "x${@HOME_X@}y", "${@LIBS@}", "", "$q'\""]),
                   max_size=3)
_ops = st.builds(ListOp, st.sampled_from(["prepend", "append", "set", "unset"]),
                 _values.map(tuple))
_envs = st.builds(
    Env,
    lists=st.dictionaries(_names, st.lists(_ops, max_size=3).map(tuple), max_size=3),
    scalars=st.dictionaries(st.sampled_from(["S1", "HOME_X"]),
                            st.none() | st.sampled_from(["v", "${@PLIST@}/s", "a b"]),
                            max_size=2),
)
_environs = st.dictionaries(_names, st.sampled_from(["", "/x", "/y:/z"]), max_size=4)


def shell_model(env: Env, environ: Mapping[str, str]) -> dict[str, str]:
    """*environ* with *env* applied as its shell lines do: scalars, then each list operation
    in order, keeping repeated and empty entries (unlike `uenvfs run`, as uenv)."""
    out = dict(environ)
    for name, value in env.scalars.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = expand(value, out)
    for name, ops in env.lists.items():
        for op in ops:
            joined = expand(":".join(op.values), out)
            current = out.get(name, "")
            if op.op == "unset":
                out.pop(name, None)
            elif op.op == "set":
                out[name] = joined
            elif not op.values:
                out[name] = current
            elif op.op == "prepend":
                out[name] = joined + (":" + current if current else "")
            else:
                out[name] = (current + ":" if current else "") + joined
    return out


@settings(max_examples=60, deadline=None)
@given(env=_envs, environ=_environs)
def test_apply_env_is_what_the_shell_lines_do(env: Env, environ: dict[str, str]) -> None:
    lists = {k: v for k, v in env.lists.items() if k not in env.scalars}  # as parse_meta does
    env = Env(lists, env.scalars)
    script = "\n".join(shell_lines(env, None, "/unused")) + "\n/usr/bin/env -0"
    done = subprocess.run(["/bin/sh", "-c", script], env=environ, capture_output=True, check=True)
    shell = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if item)
    shell = {k: v for k, v in shell.items() if k not in ("PWD", "SHLVL", "_", "OLDPWD")}
    assert shell_model(env, environ) == shell


UENV_MOUNTINFO = rb"""22 1 254:0 / / rw - ext4 /dev/vda rw
60 22 0:40 / /run/pact/uenv rw,nosuid - fuse.uenvfs uenvfs rw
70 22 7:3 / /run/pact/uenvfs/mnt/acc ro,nosuid,nodev - squashfs /dev/loop3 ro
72 22 7:3 / /user-environment ro,nosuid,nodev - squashfs /dev/loop3 ro
80 22 7:8 / /user-tools ro,nosuid,nodev - squashfs /dev/loop8 ro
81 22 0:51 / /scratch-env rw - tmpfs tmpfs rw
82 22 0:52 / /other rw - tmpfs tmpfs rw
"""


def test_mounts_of_uenv_found_in_the_mount_table() -> None:
    """A squashfs at a mount point that is not ours (uenv's squashfs-mount), or any mount at
    a mount point that UENV_MOUNT_LIST names; never ours, nor a mount point named only."""
    entries = mountinfo.parse(UENV_MOUNTINFO)
    environ = {"UENV_MOUNT_LIST": "/r/store.squashfs:/scratch-env,/gone.squashfs:/nowhere"}
    assert foreign_here(entries, {"/user-environment": "acc"}, environ) == {
        "/run/pact/uenvfs/mnt/acc": "a squashfs mount of /dev/loop3",
        "/user-tools": "a squashfs mount of /dev/loop8",
        "/scratch-env": "a tmpfs mount of tmpfs (/r/store.squashfs in UENV_MOUNT_LIST)"}
