"""Flags shared by the launcher tests."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples" / "pretrain_gpt.py")

CPU = ["--distributed-backend", "gloo", "--transformer-impl", "local"]
"""What a CPU-only machine needs on any command line (the checks before start insist)."""

SMALL = ["--hidden-size", "64", "--seq-length", "32", "--max-position-embeddings", "32",
         "--vocab-size", "128"]
"""A smaller GPT than train's default (8 layers, PP=4 x VPP=2 stay): faster iterations."""
