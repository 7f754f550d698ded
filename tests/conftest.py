"""Shared fixtures: one gloo worker pool per world size for the whole session."""
from __future__ import annotations

import pytest

from megatron_offload.testing.pool import close_session_pools, session_pool


@pytest.fixture(scope="session")
def pool4():
    """Four spawned ranks with gloo initialized once; cases re-initialize Megatron's groups."""
    return session_pool(4)


def pytest_sessionfinish(session, exitstatus):
    close_session_pools()
