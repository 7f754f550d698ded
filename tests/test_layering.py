"""The package's import graph: one direction through the layers, no cycles.

Every module of ``megatron_offload`` is parsed (no import runs) and every import is counted,
at module level and inside functions alike. The layers and what each may import are written
here once (``docs/architecture.md`` shows the same table): a module may import its own layer
and the layers listed for it, nothing above; the whole graph, modules within one layer
included, has no cycle; and an import of a ``megatron_offload`` module that does not exist
(a relative import left behind by a move) is an error too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_offload"

LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": ("megatron_offload", "megatron_offload.releases", "megatron_offload.config"),
    "schedule": ("megatron_offload.schedule",),
    "planning": ("megatron_offload.planning",),
    "runtime": ("megatron_offload.runtime",),
    "integration": ("megatron_offload.integration",),
    "commands": ("megatron_offload.cli", "megatron_offload.launch"),
    "gpu_check": ("megatron_offload.gpu_check",),
    "testing": ("megatron_offload.testing",),
}
"""Each layer's modules (a name covers the module and everything under it)."""

MAY_IMPORT: dict[str, frozenset[str]] = {
    "foundation": frozenset(),
    "schedule": frozenset({"foundation"}),
    "planning": frozenset({"foundation", "schedule"}),
    "runtime": frozenset({"foundation", "schedule"}),
    "integration": frozenset({"foundation", "schedule", "planning", "runtime"}),
    "commands": frozenset({"foundation", "schedule", "planning", "runtime", "integration"}),
    "gpu_check": frozenset({"foundation", "schedule", "planning", "runtime", "integration"}),
    "testing": frozenset({"foundation", "schedule", "planning", "runtime", "integration",
                          "commands"}),
}
"""The allowed direction: the layers each layer may import besides its own. Planning and the
runtime stand side by side (neither imports the other); the GPU check and the test harness
stand on the product, and no product module imports them."""


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package at ``root``."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path: Path, package: str) -> set[str]:
    """Every module of ``package`` that ``module`` imports, wherever the import statement is
    (relative imports resolved). ``from pkg import name`` imports ``pkg`` (its ``__init__``
    runs) and also ``pkg.name`` when that is a module; ``import a.b.c`` counts ``a.b.c``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: None if is_package else -1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target + ":" + ",".join(alias.name for alias in node.names))
    return {name for name in found if name.split(":")[0] == package
            or name.startswith(package + ".")}


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(module -> the package's modules it imports, [(module, missing import)])."""
    modules = package_modules(root)
    graph, missing = {}, []
    for module, path in modules.items():
        targets = set()
        for name in sorted(imported_modules(module, path, root.name)):
            target, _, names = name.partition(":")
            if not names:  # `import a.b`
                targets.add(target)
                continue
            if target not in modules:
                missing.append((module, target))
                continue
            # `from pkg import mod` runs pkg/__init__ and imports pkg.mod: both are edges
            targets.add(target)
            targets.update({f"{target}.{n}" for n in names.split(",")} & modules.keys())
        missing.extend((module, t) for t in sorted(targets - modules.keys()))
        graph[module] = (targets & modules.keys()) - {module}
    return graph, missing


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def layer_of(module: str) -> str:
    best = max(
        ((prefix, layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
         if module == prefix or module.startswith(prefix + ".")),
        key=lambda item: len(item[0]),
    )
    return best[1]


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) != layer_of(module)
        and layer_of(target) not in MAY_IMPORT[layer_of(module)]
    )


GRAPH, MISSING = import_graph(PACKAGE)


def test_every_module_belongs_to_a_layer():
    assert set(MAY_IMPORT) == set(LAYERS)
    for module in GRAPH:
        layer_of(module)  # raises ValueError (max of nothing) for a module outside every layer


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_every_import_points_down_the_layers():
    assert upward_edges(GRAPH) == []


def test_every_internal_import_names_an_existing_module():
    assert MISSING == []


def test_no_product_module_imports_the_test_harness_or_the_gpu_check():
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if layer_of(target) in ("testing", "gpu_check")
        and layer_of(module) not in ("testing", "gpu_check")
    )
    assert offenders == []


# ------------------------------------------------------- the checker itself catches what it should
def _write(root: Path, files: dict[str, str]) -> Path:
    package = root / "demo"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "",
        "low.py": "def f():\n    from demo.high import g\n    return g\n",
        "high.py": "from demo import low\n\ndef g():\n    return low\n",
        "side.py": "from . import low\n",
    })
    graph, missing = import_graph(package)
    assert cycles(graph) == [["demo.high", "demo.low"]] and missing == []


def test_a_relative_import_of_a_missing_module_is_found(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "",
        "sub/__init__.py": "",
        "sub/a.py": "from .gone import x\nfrom ..sub import a\n",
    })
    assert import_graph(package)[1] == [("demo.sub.a", "demo.sub.gone")]


@pytest.mark.parametrize("module, target, upward", [
    ("megatron_offload.schedule.ir", "megatron_offload.planning.policy", True),
    ("megatron_offload.runtime.offloader", "megatron_offload.planning.policy", True),
    ("megatron_offload.releases", "megatron_offload.config", False),
    ("megatron_offload.integration.auto", "megatron_offload.planning.auto", False),
    ("megatron_offload.cli.plan", "megatron_offload.gpu_check.check", True),
])
def test_the_direction_rule(module, target, upward):
    assert bool(upward_edges({module: {target}})) is upward
