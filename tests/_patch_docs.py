"""What a patch set's module docstring lists (shared by the patch-set tests)."""
from __future__ import annotations

import re


def listed_symbols(doc: str) -> str:
    """The docstring with ``{a,b}`` groups also written out (``x.{a,b}`` -> ``x.a x.b``)."""
    doc = doc.replace("``", "")
    expanded = [m.group(1) + part + m.group(3)
                for m in re.finditer(r"([\w.]*)\{([\w,]+)\}([\w.]*)", doc)
                for part in m.group(2).split(",")]
    return doc + " " + " ".join(expanded)
