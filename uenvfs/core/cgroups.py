"""Where a resource manager puts the processes of an allocation: the cgroup layouts that name
an allocation (`cgroup_layouts` in the configuration), and what a `/proc/<pid>/cgroup` file
names by them.

A layout is a cgroup path from the root of a hierarchy, with placeholders in its components:

    /workload.slice/{id}.scope                    pact: `{id}` is the allocation id itself
    /system.slice/slurmstepd.scope/job_{job}      Slurm, cgroup v2: `{job}` gives `slurm-<n>`
    /slurm/uid_{uid}/job_{job}                    Slurm, cgroup v1: `{uid}` is any number

Each layout names the allocation once (`{id}` or `{job}`). A cgroup names an allocation only
where a layout matches its path from the root on, not at any depth: a user with a delegated
cgroup subtree can make `job_77` or `x.scope` anywhere below it, never at the root of the
hierarchy. Levels below the match belong to the same allocation (Slurm's `step_0/user/task_0`).
The resource manager (root) makes these cgroups, so what they name is trusted.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .names import valid_alloc

DEFAULT_LAYOUTS = (
    "/workload.slice/{id}.scope",
    "/system.slice/slurmstepd.scope/job_{job}",
    "/slurm/uid_{uid}/job_{job}",
)
# What each placeholder matches in a component. `{id}` is checked as an allocation id after.
_PLACEHOLDERS = {"id": r"(?P<id>.+)", "job": r"(?P<job>[0-9]+)", "uid": r"[0-9]+"}
_TOKEN = re.compile(r"(\{[^{}]*\})")


class LayoutError(ValueError):
    """A layout that cannot be used; the message says why."""


@dataclass(frozen=True)
class Layout:
    """One compiled layout. Invariant: exactly one of `parts` captures the allocation
    (`named`), as `{id}` or `{job}`."""

    text: str
    parts: tuple[re.Pattern[str], ...]  # one per component, matched whole
    named: int  # the index of the component that names the allocation

    def allocation(self, path: Sequence[str]) -> str | None:
        """The allocation that the cgroup of components *path* (from the root) is in, or
        None."""
        if len(path) < len(self.parts):
            return None
        found = None
        for i, pattern in enumerate(self.parts):
            match = pattern.fullmatch(path[i])
            if match is None:
                return None
            if i == self.named:
                found = match
        assert found is not None
        groups = found.groupdict()
        alloc = groups["id"] if "id" in groups else f"slurm-{groups['job']}"
        return alloc if valid_alloc(alloc) else None


def parse_layout(text: str) -> Layout:
    """The layout *text* compiled. Raises `LayoutError`."""
    if not text.startswith("/"):
        raise LayoutError(f"cgroup layout {text!r} must start with / (the root of a hierarchy)")
    parts, named = [], []
    for i, component in enumerate(text.split("/")[1:]):
        if component in ("", ".", ".."):
            raise LayoutError(f"cgroup layout {text!r}: empty, . or .. component")
        pattern = []
        for token in _TOKEN.split(component):
            if token.startswith("{") and token.endswith("}"):
                key = token[1:-1]
                if key not in _PLACEHOLDERS:
                    raise LayoutError(f"cgroup layout {text!r}: unknown placeholder {token} "
                                      "(known: {id}, {job}, {uid})")
                if key != "uid":
                    named.append(i)
                pattern.append(_PLACEHOLDERS[key])
            elif "{" in token or "}" in token:
                raise LayoutError(f"cgroup layout {text!r}: stray brace in {component!r}")
            else:
                pattern.append(re.escape(token))
        parts.append(re.compile("".join(pattern)))
    if len(named) != 1:
        raise LayoutError(f"cgroup layout {text!r} must name the allocation once: one {{id}} "
                          "or {job}")
    return Layout(text, tuple(parts), named[0])


def parse_layouts(texts: Iterable[str]) -> tuple[Layout, ...]:
    """Every layout of *texts* compiled, in order. Raises `LayoutError`."""
    return tuple(map(parse_layout, texts))


def allocation(cgroup_file: str, layouts: Sequence[Layout]) -> str | None:
    """The allocation that a `/proc/<pid>/cgroup` file names at one of *layouts*, or None.

    The unified hierarchy (`0::`) is read first, then the v1 hierarchies in order; in each,
    the layouts in order. A path outside the reader's cgroup namespace (`/../x`) matches none.
    """
    lines = cgroup_file.splitlines()
    lines.sort(key=lambda line: not line.startswith("0::"))
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) < 3 or not fields[2].startswith("/"):
            continue
        path = fields[2].split("/")[1:]
        for layout in layouts:
            alloc = layout.allocation(path)
            if alloc is not None:
                return alloc
    return None
