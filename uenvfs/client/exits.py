"""The exit codes of the `uenvfs` command (docs/interface.md lists them, and for which
subcommands), and the errors that lead to one. Each name has one meaning; `run`, `start` and
`attach` use 125 to 127 as env(1) and chroot(1) do, so that no code of theirs can be taken for
one of the command they run."""

from __future__ import annotations

OK = 0
FAILED = 1  # the daemon refused the command or failed; an image command failed
USAGE = 2  # bad usage, or an invalid configuration
NO_DAEMON = 3  # no uenvfs serving at the mountpoint
RUN_FAILED = 125  # `run`, `start`, `attach`: uenvfs itself failed (also bad usage)
CANNOT_EXECUTE = 126  # `run`, `start`: the command cannot be executed
NOT_FOUND = 127  # `run`, `start`: the command was not found
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
BROKEN_PIPE = 141  # the reader of the output went away: as a process killed by SIGPIPE


class CliError(Exception):
    """A subcommand (but `run`, `start`, `attach`) failed; the message says why, in one line,
    and `code` is the exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


class RunError(Exception):
    """`run`, `start` or `attach` cannot set the session up (exit RUN_FAILED); the message
    says why. Nothing has been done."""
