"""docs/compatibility.md is generated from the release and refusal tables and is not stale;
setup.py requires the supported range that releases.py states."""
from __future__ import annotations

import ast
from pathlib import Path

from megatron_offload.integration.compatibility import COMMAND, render
from megatron_offload.releases import RELEASES, SUPPORTED_RANGE, SUPPORTED_TEXT

ROOT = Path(__file__).resolve().parents[2]


def test_docs_compatibility_is_generated_and_current():
    text = (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    assert text == render(), f"docs/compatibility.md is stale: run {COMMAND}"


def test_the_document_names_every_release_and_no_outside_document():
    text = render()
    assert SUPPORTED_TEXT in text and f"megatron-core{SUPPORTED_RANGE}" in text
    assert all(f"| 0.{minor} " in text for minor in RELEASES)
    assert "://" not in text


def test_setup_requires_the_supported_range_without_importing_the_package():
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    function = next(node for node in tree.body
                    if isinstance(node, ast.FunctionDef) and node.name == "supported_range")
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               and "setuptools" not in ast.unparse(node)]
    module = ast.Module(body=imports + [function], type_ignores=[])
    namespace = {"__file__": str(ROOT / "setup.py")}
    exec(compile(module, "setup.py", "exec"), namespace)
    assert namespace["supported_range"]() == SUPPORTED_RANGE
    assert 'f"megatron-core{supported_range()}"' in (ROOT / "setup.py").read_text(encoding="utf-8")
