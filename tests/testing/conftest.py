"""Fixtures of the CPU harness tests.

One gloo worker pool per world size lives for the whole session (``session_pool``); the
fixtures are function-scoped lookups so that a test which breaks a pool gets the next test
a fresh one instead of a dead one.
"""
import pytest

from megatron_offload.testing.pool import session_pool


@pytest.fixture
def pool1():
    return session_pool(1)


@pytest.fixture
def pool2():
    return session_pool(2)


@pytest.fixture
def pool4():
    return session_pool(4)
