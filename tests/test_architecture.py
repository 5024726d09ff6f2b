"""The layering drawn in docs/ARCHITECTURE.md, enforced on the source.

Every ``import`` of a ``sendense_nbd`` module is read from the syntax tree,
wherever it appears (top level, ``TYPE_CHECKING`` blocks, function bodies):
each package may import only the layers below it, and no two modules may
import each other, directly or around a loop.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sendense_nbd"

#: What each top-level module or package may import, besides itself. A name
#: allows that module and everything under it. Keep in step with ARCHITECTURE.md.
ALLOWED: dict[str, frozenset[str]] = {
    "lazy": frozenset(),
    "errors": frozenset({"protocol.constants"}),
    "fields": frozenset({"errors"}),
    "http_api": frozenset({"errors"}),
    "protocol": frozenset({"errors"}),
    "storage": frozenset({"protocol", "errors", "lazy"}),
    "tcp": frozenset({"errors"}),
    "tls": frozenset({"errors", "lazy"}),
    "client": frozenset({"protocol", "tcp", "tls", "errors", "lazy"}),
    "server": frozenset({"storage", "protocol", "tcp", "tls", "errors", "lazy"}),
    "copy": frozenset({"client", "storage", "protocol", "tls", "errors", "lazy"}),
    "vmware": frozenset({"errors", "lazy"}),
    "tunnel": frozenset({"tcp", "errors", "lazy"}),
    "backup": frozenset({"copy", "client", "vmware", "protocol", "errors", "lazy"}),
    "policy": frozenset({"fields", "backup.records", "errors"}),
    "offsite": frozenset({"copy", "storage", "policy.offsite", "fields", "errors", "lazy"}),
    "hub": frozenset(
        {
            "server",
            "copy",
            "client",
            "storage",
            "protocol",
            "tls",
            "backup.records",
            "policy",
            "offsite",
            "fields",
            "http_api",
            "errors",
            "lazy",
        }
    ),
    "node": frozenset(
        {"backup", "copy", "client", "tls", "vmware", "fields", "http_api", "errors", "lazy", "__init__"}
    ),
    "cli": frozenset(
        {
            "hub",
            "policy",
            "offsite",
            "node",
            "tunnel",
            "tcp",
            "tls",
            "backup",
            "vmware",
            "copy",
            "server",
            "client",
            "storage",
            "protocol",
            "fields",
            "http_api",
            "errors",
            "lazy",
            "__init__",
        }
    ),
    "__init__": frozenset({"server", "client", "storage", "protocol", "errors", "lazy"}),
    "__main__": frozenset({"cli"}),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> Iterator[str]:
    """The ``sendense_nbd`` modules a file imports, anywhere in it."""
    module = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            yield from submodules
            if len(submodules) < len(node.names):
                yield base


def _layer(module: str) -> str:
    """``sendense_nbd.hub.api`` -> ``hub``; the root package is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _allows(allowed: frozenset[str], target: str) -> bool:
    name = "__init__" if target == "sendense_nbd" else target.removeprefix("sendense_nbd.")
    return any(name == entry or name.startswith(entry + ".") for entry in allowed)


def test_every_layer_is_in_the_table() -> None:
    layers = {_layer(module) for module in MODULES}
    assert layers == set(ALLOWED), "add the new package to ALLOWED and to docs/ARCHITECTURE.md"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    layer = _layer(module)
    wrong = sorted(
        target
        for target in set(_imports(MODULES[module]))
        if target.startswith("sendense_nbd") and _layer(target) != layer and not _allows(ALLOWED[layer], target)
    )
    assert not wrong, f"{module} imports {wrong}, which the {layer!r} layer may not (docs/ARCHITECTURE.md)"


def test_no_import_cycles() -> None:
    graph = {module: {t for t in _imports(path) if t in MODULES and t != module} for module, path in MODULES.items()}
    cycles = []
    done: set[str] = set()

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            cycles.append(trail[trail.index(module) :] + [module])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)
