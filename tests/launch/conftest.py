"""Shared flags of the launcher tests: Megatron-LM's real pretrain() on CPU needs
megatron/training, which megatron-core ships in its wheel from 0.17 on (0.16.1: skipped)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Skip every test of this folder without megatron/training (an importorskip at the top
    of a conftest is an error, not a skip, when pytest collects the folder)."""
    if importlib.util.find_spec("megatron.training") is not None:
        return
    skip = pytest.mark.skip(reason="megatron-core >= 0.17 ships megatron/training")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


@pytest.fixture
def clean_launch():
    """Undo what an in-process launch did: patches, CPU support, sys.argv, sys.path."""
    from megatron_offload.integration import megatron_lm

    argv, path = list(sys.argv), list(sys.path)
    yield
    megatron_lm.remove()
    sys.argv[:], sys.path[:] = argv, path
