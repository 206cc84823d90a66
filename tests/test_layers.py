"""The package's layers: imports point down only, and nothing imports in a circle.

Read from the source (every ``import`` and ``from ... import``, those under
``TYPE_CHECKING`` included), so a new module is checked without being listed.
docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "threshold"

#: What each part of the package may import from threshold. A part not listed
#: here must be added, with its place in docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "schema": {"schema"},
    "wire": {"wire", "schema"},
    "logs": set(),
    "mux": {"mux", "wire", "schema", "logs"},
    "relay": {"mux", "wire", "schema", "logs"},
    "config": {"config", "schema", "wire", "mux"},
    "tls": {"config", "schema", "wire"},
    "keygen": {"schema", "wire"},
    "doctables": {"schema", "config", "mux", "server"},
    "testing": {"mux", "wire", "schema", "logs"},
    "cluster": {"cluster", "schema", "wire", "logs", "tls", "config"},
    "server": {
        "server",
        "cluster",
        "relay",
        "mux",
        "wire",
        "schema",
        "logs",
        "tls",
        "config",
    },
    "client": {"client", "relay", "mux", "wire", "schema", "logs", "tls", "config"},
    "ctl": {"ctl", "wire", "schema", "tls", "config"},
    "tap": {
        "tap",
        "server",
        "client",
        "cluster",
        "relay",
        "mux",
        "wire",
        "schema",
        "logs",
        "tls",
        "config",
    },
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("threshold",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The threshold modules ``path`` imports (a package's submodules resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("threshold"):
                found.add(node.module)
                for alias in node.names:
                    name = f"{node.module}.{alias.name}"
                    if name in modules:
                        found.add(name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("threshold"))
    # ``from threshold import logs`` names the module, not the package.
    return {name for name in found if name in modules and name != "threshold"}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


class LayerTests(SynchronousTestCase):
    def setUp(self):
        self.modules = _modules()
        self.graph = {
            name: _imports(path, self.modules) - {name}
            for name, path in self.modules.items()
        }

    def test_every_part_has_a_layer(self):
        """Each top-level part of the package is placed in the layer table."""
        parts = {_part(m) for m in self.modules} - {""}
        self.assertEqual(parts - set(ALLOWED), set())

    def test_imports_point_down(self):
        """No module imports a part above its own (roles never each other)."""
        wrong = sorted(
            f"{name} imports {dep}"
            for name, deps in self.graph.items()
            for dep in deps
            if _part(name) in ALLOWED
            and _part(dep) != _part(name)
            and _part(dep) not in ALLOWED[_part(name)]
        )
        self.assertEqual(wrong, [])

    def test_no_import_circle(self):
        """No chain of imports leads from a module back to itself."""
        circles = []
        done: set[str] = set()

        def visit(name: str, path: list[str]) -> None:
            for dep in sorted(self.graph[name]):
                if dep in path:
                    circles.append(" -> ".join(path[path.index(dep) :] + [dep]))
                elif dep not in done:
                    visit(dep, path + [dep])
            done.add(name)

        for name in sorted(self.graph):
            if name not in done:
                visit(name, [name])
        self.assertEqual(circles, [])

    def test_the_checker_sees_imports(self):
        """The import reader finds what a module really imports."""
        self.assertIn("threshold.mux.session", self.graph["threshold.server.control"])
