"""What a valid image name and a valid allocation id look like. Pure: shared by every layer."""

from __future__ import annotations

import re

MAX_NAME = 255
# An allocation id ends up in .status, the journal and .control: one plain word.
_VALID_ALLOC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}$")


def valid_name(name: str) -> bool:
    """Whether *name* can name an image: one path component, printable, no blanks.

    Names go into `.control` commands (blank-separated), `.status` (JSON) and paths, so they
    are plain words: no '/', NUL, whitespace or control characters, not starting with '.'
    (which keeps `.`, `..` and the control files apart), at most 255 bytes of UTF-8.
    """
    if not name or name.startswith("."):
        return False
    try:
        if len(name.encode("utf-8")) > MAX_NAME:
            return False
    except UnicodeEncodeError:  # a lone surrogate: not valid UTF-8
        return False
    return all(c.isprintable() and not c.isspace() and c != "/" for c in name)


def valid_alloc(alloc: str) -> bool:
    return _VALID_ALLOC.match(alloc) is not None
