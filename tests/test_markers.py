"""The ``peer`` marker: every test module that reaches for a peer carries it, and only those need the peers.

A module "reaches for a peer" when it imports libnbd, calls something with a peer tool's name as the
command (``run("qemu-img", ...)``, ``require("nbdkit")``, ``Popen(["nbdcopy", ...])``), or uses a helper
(a fixture or function of a non-test module under tests/) that does. The check is static, on the AST.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.conftest import PEERS

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def _names_a_peer(node: ast.expr) -> bool:
    """``node`` is a peer tool's name, or a command list/tuple that starts with one (or with ``require(...)``)."""
    if isinstance(node, ast.Constant):
        return node.value in PEERS
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        first = node.elts[0]
        return _names_a_peer(first) or (isinstance(first, ast.Call) and _called_name(first) == "require")
    return False


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _is_fixture(node: ast.AST) -> bool:
    decorators = getattr(node, "decorator_list", [])
    return any("fixture" in ast.unparse(decorator) for decorator in decorators)


def _used_names(tree: ast.AST, *, loads: bool) -> Iterator[str]:
    """Names the code takes from elsewhere: imported names, the parameters of tests and fixtures
    (fixtures by name) and, with ``loads``, the names it reads but does not bind itself."""
    nodes = list(ast.walk(tree))
    bound = {n.arg for n in nodes if isinstance(n, ast.arg)}
    bound |= {n.id for n in nodes if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    for node in nodes:
        if isinstance(node, ast.alias):
            yield node.asname or node.name
        elif isinstance(node, ast.Name) and loads and node.id not in bound:
            yield node.id
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
            node.name.startswith("test_") or _is_fixture(node)
        ):
            yield from (arg.arg for arg in node.args.args + node.args.kwonlyargs)


def uses_peer(tree: ast.AST, helpers: Iterable[str] = (), *, loads: bool = False) -> bool:
    """``tree`` imports libnbd, runs a peer tool directly, or uses one of the peer ``helpers``
    (read by name only with ``loads``: in a test module a helper is imported or a fixture)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(alias.name == "nbd" for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "nbd":
            return True
        if isinstance(node, ast.Call) and node.args and _names_a_peer(node.args[0]):
            return True
    return not set(helpers).isdisjoint(_used_names(tree, loads=loads))


def peer_helpers(modules: dict[Path, ast.Module]) -> set[str]:
    """Top-level names of non-test modules (conftests, helpers) that reach for a peer, transitively."""
    definitions = [
        node
        for path, tree in modules.items()
        if not path.name.startswith("test_")
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    helpers: set[str] = set()
    while True:
        found = {node.name for node in definitions if node.name not in helpers and uses_peer(node, helpers, loads=True)}
        if not found:
            return helpers
        helpers |= found


def marked_peer(tree: ast.Module) -> bool:
    """The module sets ``pytestmark = pytest.mark.peer`` (alone or in a list)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            values = node.value.elts if isinstance(node.value, ast.List | ast.Tuple) else [node.value]
            return any(ast.unparse(value) == "pytest.mark.peer" for value in values)
    return False


def unmarked_peer_modules(root: Path) -> list[str]:
    """Test modules under ``root`` that reach for a peer without the module-level ``peer`` marker."""
    modules = {path: ast.parse(path.read_text(), str(path)) for path in sorted(root.rglob("*.py"))}
    helpers = peer_helpers(modules)
    return [
        str(path.relative_to(root))
        for path, tree in modules.items()
        if path.name.startswith("test_") and uses_peer(tree, helpers) and not marked_peer(tree)
    ]


def test_every_module_that_reaches_for_a_peer_is_marked() -> None:
    assert unmarked_peer_modules(TESTS) == [], "add `pytestmark = pytest.mark.peer` to these modules"


def test_the_check_finds_each_kind_of_peer_use(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("def disk_map(uri):\n    return subprocess.run(['nbdinfo', '--map', uri])\n")
    (tmp_path / "conftest.py").write_text("@pytest.fixture\ndef mapped(uri):\n    return disk_map(uri)\n")
    cases = {
        "test_libnbd.py": "import nbd\n",
        "test_tool.py": "def test_x(tmp_path):\n    run('qemu-img', 'create', str(tmp_path))\n",
        "test_required.py": "def test_x():\n    Popen([require('nbdkit'), '-f'])\n",
        "test_helper.py": "from helpers import disk_map\n",
        "test_fixture.py": "def test_x(mapped):\n    assert mapped\n",
        "test_unrelated.py": "def test_x(uri):\n    def disk_map(uri):\n        return uri\n\n    disk_map(uri)\n",
        "test_marked.py": "import pytest\nimport nbd\n\npytestmark = pytest.mark.peer\n",
        "test_listed.py": "import pytest\nimport nbd\n\npytestmark = [pytest.mark.peer, pytest.mark.slow]\n",
        "test_pure.py": "def test_x():\n    assert ['nbdkit', '--exit-with-parent'] == build()\n",
    }
    for name, source in cases.items():
        (tmp_path / name).write_text(source)
    assert unmarked_peer_modules(tmp_path) == sorted(
        ["test_fixture.py", "test_helper.py", "test_libnbd.py", "test_required.py", "test_tool.py"]
    )


def test_unit_tests_run_without_peers_and_peer_tests_fail(tmp_path: Path) -> None:
    """With no peer on PATH and libnbd not importable, unit tests pass and a ``peer`` test fails at setup."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "nbd.py").write_text("raise ImportError('libnbd hidden by the test')\n")
    unit = "tests/protocol/test_wire.py"
    peer = "tests/storage/qcow2/test_commit.py::test_commit_keeps_the_overlays_view"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", unit, peer],
        cwd=ROOT,
        env={"PATH": str(tmp_path), "PYTHONPATH": str(shadow)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 1 and " passed" in summary and "2 errors" in summary, result.stdout
    assert "failed" not in summary, result.stdout
    assert f"peers not installed: {', '.join(PEERS)}, python3-libnbd; run ./setup.sh" in result.stdout
