"""CPU test harness: megatron-core 0.16 to 0.19 without CUDA, on gloo, in reusable worker pools.

The patches that let megatron-core run on CPU are part of the product
(:mod:`megatron_offload.integration.cpu.core`: ``apply_cpu_shims()`` / ``remove_cpu_shims()``):
the workers apply them.

- ``pool``: ``WorkerPool(world_size)`` and ``session_pool(world_size)``.
- ``gpt``: ``TinyGPTCase`` and the tiny GPTModel factory (layout-independent weights); knobs
  for what real Megatron-LM GPU jobs use (fused wgrad, overlapped grad reduce / param gather,
  distributed optimizer, bf16, Llama-style layers, selective recompute, MoE, variable
  sequence length).
- ``reference``: ``run_case`` (runs in a pool worker; plain SGD or megatron-core's Adam),
  ``merge_ranks``, ``compare_runs``, ``compare_runs_per_rank``.

Importing this package does not import megatron-core; the workers do.
"""
from megatron_offload.testing.gpt import TinyGPTCase
from megatron_offload.testing.pool import (
    PoolClosed,
    PoolTimeout,
    WorkerDied,
    WorkerError,
    WorkerPool,
    close_session_pools,
    session_pool,
)
from megatron_offload.testing.reference import (
    SAFE_FAULT_PP2_M4,
    compare_runs,
    compare_runs_per_rank,
    merge_ranks,
)

RUN_CASE = "megatron_offload.testing.reference:run_case"
"""The pool task target of ``reference.run_case``."""

__all__ = [
    "TinyGPTCase", "WorkerPool",
    "session_pool", "close_session_pools", "WorkerError", "WorkerDied", "PoolTimeout",
    "PoolClosed", "compare_runs", "compare_runs_per_rank", "merge_ranks", "SAFE_FAULT_PP2_M4",
    "RUN_CASE",
]
