"""How uenvfs starts its own processes: the installed code, never a module of the working
directory (issue 27; through a real daemon in tests/mount/test_sources_hostile.py)."""

from __future__ import annotations

import sys

from uenvfs.keeper.protocol import keeper_argv, server_argv, uenvfs_args


def test_servers_and_keepers_run_python_with_no_unsafe_path() -> None:
    assert server_argv(["serve", "--images", "/i"]) == [
        sys.executable, "-P", "-m", "uenvfs", "serve", "--images", "/i"]
    assert keeper_argv() == [sys.executable, "-P", "-m", "uenvfs.keeper"]


def test_an_adopted_server_command_is_started_as_the_installed_code_does() -> None:
    """A keeper run by `restart` after an upgrade gets the old server's command."""
    old = ["/usr/bin/python3", "-m", "uenvfs", "serve", "--mountpoint", "/m"]
    assert server_argv(uenvfs_args(old)) == [
        sys.executable, "-P", "-m", "uenvfs", "serve", "--mountpoint", "/m"]
    assert uenvfs_args(server_argv(["serve"])) == ["serve"]
