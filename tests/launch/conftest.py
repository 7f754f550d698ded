"""Shared flags of the launcher tests: Megatron-LM's real pretrain() on CPU needs
megatron/training, which megatron-core ships in its wheel from 0.17 on (0.16.1: skipped)."""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("megatron.training", reason="megatron-core >= 0.17 ships megatron/training")

@pytest.fixture
def clean_launch():
    """Undo what an in-process launch did: patches, CPU support, sys.argv, sys.path."""
    from megatron_offload.integration import megatron_lm

    argv, path = list(sys.argv), list(sys.path)
    yield
    megatron_lm.remove()
    sys.argv[:], sys.path[:] = argv, path
