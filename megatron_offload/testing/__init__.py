"""CPU test harness: megatron-core 0.16 without CUDA, on gloo, in reusable worker pools.

- ``cpu_shims``: ``apply_cpu_shims()`` / ``remove_cpu_shims()`` / ``cpu_shims.cpu_shims()``, the
  targeted, reversible patches that let megatron-core run on CPU (incl. the gloo
  async-send keep-alive that makes ``overlap_p2p_comm`` + ``deallocate_pipeline_outputs``
  safe).
- ``pool``: ``WorkerPool(world_size)`` and ``session_pool(world_size)``.
- ``gpt``: ``TinyGPTCase`` and the tiny GPTModel factory (layout-independent weights).
- ``reference``: ``run_case`` (runs in a pool worker), ``merge_ranks``, ``compare_runs``.

Importing this package does not import megatron-core; the workers do.
"""
from megatron_offload.testing.cpu_shims import apply_cpu_shims, remove_cpu_shims
from megatron_offload.testing.gpt import TinyGPTCase
from megatron_offload.testing.pool import (
    PoolClosed, PoolTimeout, WorkerDied, WorkerError, WorkerPool, close_session_pools,
    session_pool,
)
from megatron_offload.testing.reference import SAFE_FAULT_PP2_M4, compare_runs, merge_ranks

RUN_CASE = "megatron_offload.testing.reference:run_case"
"""The pool task target of ``reference.run_case``."""

__all__ = [
    "apply_cpu_shims", "remove_cpu_shims", "TinyGPTCase", "WorkerPool",
    "session_pool", "close_session_pools", "WorkerError", "WorkerDied", "PoolTimeout",
    "PoolClosed", "compare_runs", "merge_ranks", "SAFE_FAULT_PP2_M4", "RUN_CASE",
]
