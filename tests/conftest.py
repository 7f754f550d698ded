"""Shared fixtures: one gloo worker pool per world size for the whole session.

Nothing here imports torch or megatron-core: the pool module is imported by the fixture that
needs it, and its pools are closed at the end only if it was imported."""
from __future__ import annotations

import sys

import pytest

POOL_MODULE = "megatron_offload.testing.pool"


@pytest.fixture(scope="session")
def pool4():
    """Four spawned ranks with gloo initialized once; cases re-initialize Megatron's groups."""
    from megatron_offload.testing.pool import session_pool

    return session_pool(4)


def pytest_sessionfinish(session, exitstatus):
    pool = sys.modules.get(POOL_MODULE)
    if pool is not None:
        pool.close_session_pools()
