"""What ``docs/architecture.md`` states about the package holds.

- Its table of layers is the one ``tests/test_layering.py`` checks the import graph against
  (``LAYERS`` and ``MAY_IMPORT``): same layers, in the same order, same modules, same
  allowed imports.
- Every module of the package is named in it (and, outside the test harness, in the README's
  Layout section), so the document and the README follow the tree.
- The pure layers (the foundation, ``schedule``, ``planning`` and the commands) never import
  torch or megatron-core: every one of their modules is imported in a fresh interpreter that
  records each attempt, so an import inside ``try``, or one that would succeed because torch is
  installed, counts too. The fast lane runs this without torch; the torch environments do not
  run it again.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from test_layering import LAYERS, MAY_IMPORT, PACKAGE, layer_of, package_modules

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

PURE_LAYERS = ("foundation", "schedule", "planning", "commands")
"""The layers that run without torch and megatron-core (the rest need both)."""

HEAVY = ("torch", "megatron")
"""Top-level packages the pure layers never import."""


def documented_layers(text: str) -> list[tuple[str, tuple[str, ...], frozenset[str]]]:
    """The rows of the doc's layer table: (layer, modules, layers it may import).

    The table is the one whose header reads ``| layer | modules | may import |``; names are
    written in backticks; "nothing" means an empty set."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines)
                  if [cell.strip() for cell in line.strip().strip("|").split("|")]
                  == ["layer", "modules", "may import"])
    rows = []
    for line in lines[header + 2:]:  # skip the |---| line
        if not line.startswith("|"):
            break
        layer, modules, may = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows.append((
            layer.strip("`"),
            tuple(re.findall(r"`([^`]+)`", modules)),
            frozenset(re.findall(r"`([^`]+)`", may)),
        ))
    return rows


def test_the_docs_layer_table_is_the_one_the_layering_test_checks():
    rows = documented_layers(DOC.read_text(encoding="utf-8"))
    assert [layer for layer, _, _ in rows] == list(LAYERS)
    assert {layer: modules for layer, modules, _ in rows} == LAYERS
    assert {layer: may for layer, _, may in rows} == MAY_IMPORT


def test_the_table_parser_reads_what_it_should():
    text = ("intro\n\n| layer | modules | may import |\n|---|---|---|\n"
            "| `low` | `pkg`, `pkg.a` | nothing |\n| `high` | `pkg.b` | `low` |\n\nafter | x |\n")
    assert documented_layers(text) == [
        ("low", ("pkg", "pkg.a"), frozenset()), ("high", ("pkg.b",), frozenset({"low"}))]


RECORD_IMPORTS = """
import importlib, json, sys

heavy = tuple(sys.argv[1].split(","))
attempts, failures, current = [], [], [None]


class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name in heavy:  # `import torch.x` and `from torch.x import y` look up torch first
            attempts.append(f"{current[0]} imports {name}")
        return None  # let the import go on (or fail) as it would


sys.meta_path.insert(0, Recorder())
for module in sys.argv[2:]:
    current[0] = module
    try:
        importlib.import_module(module)
    except ImportError as error:
        failures.append(f"{module}: {error!r}")
print(json.dumps({"attempts": attempts, "failures": failures}))
"""


def pure_modules() -> list[str]:
    return sorted(
        module for module in package_modules(PACKAGE)
        if layer_of(module) in PURE_LAYERS
        and not module.endswith(".__main__")  # importing one would run its command
    )


def test_the_pure_layers_never_import_torch_or_megatron():
    modules = pure_modules()
    assert "megatron_offload.schedule.ir" in modules and "megatron_offload.cli.plan" in modules
    assert not any(m.startswith(("megatron_offload.runtime", "megatron_offload.integration"))
                   for m in modules)
    result = subprocess.run(
        [sys.executable, "-c", RECORD_IMPORTS, ",".join(HEAVY), *modules],
        check=True, capture_output=True, text=True,
    )
    found = json.loads(result.stdout.splitlines()[-1])
    assert found == {"attempts": [], "failures": []}


README = DOC.parents[1] / "README.md"


def _layout_section(text: str) -> str:
    start = text.index("## Layout")
    return text[start:text.index("\n## ", start + 1) if "\n## " in text[start + 1:] else None]


def test_every_module_is_named_in_the_architecture_document_and_the_readme():
    doc, layout = DOC.read_text(encoding="utf-8"), _layout_section(README.read_text("utf-8"))
    files = [path for module, path in package_modules(PACKAGE).items()
             if path.name not in ("__init__.py", "__main__.py")]
    assert [str(p) for p in files if p.name not in doc] == []
    assert [str(p) for p in files if p.name not in layout
            and layer_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts))
            != "testing"] == []
