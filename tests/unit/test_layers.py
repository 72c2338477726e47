"""The package's folders are its layers: each imports only from the layers below it, and no
module imports another that imports it back, type-only imports included."""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import pytest

PACKAGE = pathlib.Path(__file__).parents[2] / "uenvfs"

# Lowest first: a layer may import from itself and from the layers before it.
LAYERS = ("core", "kernel", "keeper", "image", "manager", "fuse", "server", "client")
# What the layers at the bottom may not import at all.
FORBIDDEN = {
    "core": {"trio", "pyfuse3"},
    "kernel": {"trio", "pyfuse3"},
    "keeper": {"trio", "pyfuse3"},
}


def modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name (`uenvfs.core.state`)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: pathlib.Path) -> Iterator[tuple[str, int]]:
    """(imported name, line) of every import in the module, wherever it stands (inside
    functions and `if TYPE_CHECKING:` too). Relative imports are made absolute."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            yield stem, node.lineno
            for alias in node.names:  # `from . import x`: x may be a module
                yield f"{stem}.{alias.name}", node.lineno


def internal(target: str, known: dict[str, pathlib.Path]) -> str | None:
    """The module of the package that *target* names (a module, or a name in one)."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def edges() -> dict[str, set[tuple[str, int]]]:
    known = modules()
    graph: dict[str, set[tuple[str, int]]] = {}
    for name, path in known.items():
        graph[name] = set()
        for target, line in imports(name, path):
            found = internal(target, known)
            if found and found != name and found != "uenvfs":
                graph[name].add((found, line))
    return graph


def test_every_module_is_in_a_layer() -> None:
    loose = [m for m in modules() if layer(m) not in LAYERS
             and m not in ("uenvfs", "uenvfs.__main__")]
    assert not loose, f"modules outside the layer folders {LAYERS}: {loose}"


def test_imports_go_down_only() -> None:
    upward = []
    for name, targets in edges().items():
        mine = layer(name)
        if mine is None:
            continue  # uenvfs/__main__.py: the entry point, above every layer
        for target, line in targets:
            theirs = layer(target)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{name}:{line} imports {target} ({mine} -> {theirs})")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("bottom", sorted(FORBIDDEN))
def test_bottom_layers_do_without_trio_and_pyfuse3(bottom: str) -> None:
    known = modules()
    bad = [f"{name}:{line} imports {target}"
           for name, path in known.items() if layer(name) == bottom
           for target, line in imports(name, path)
           if target.split(".")[0] in FORBIDDEN[bottom]]
    assert not bad, "\n".join(bad)


def test_keeper_needs_the_kernel_layer_only() -> None:
    """The keeper must start whatever state the rest of the package is in."""
    bad = [f"{name} imports {target}" for name, targets in edges().items()
           if layer(name) == "keeper" for target, _ in targets
           if layer(target) not in ("keeper", "kernel")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = {name: {t for t, _ in targets} for name, targets in edges().items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path: pathlib.Path) -> None:
    """The two rules above are read from the code: a planted violation is found."""
    source = 'from ..server import daemon\nfrom .b import x\n'
    (tmp_path / "a.py").write_text(source)
    found = list(imports("uenvfs.core.a", tmp_path / "a.py"))
    assert ("uenvfs.server.daemon", 1) in found or ("uenvfs.server", 1) in found
    assert ("uenvfs.core.b", 2) in found
