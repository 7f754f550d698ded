"""CPU test harness: megatron-core 0.16 to 0.19 without CUDA, on gloo, in reusable worker pools.

- ``cpu_shims``: ``apply_cpu_shims()`` / ``remove_cpu_shims()`` / ``cpu_shims.cpu_shims()``, the
  targeted, reversible patches that let megatron-core run on CPU (incl. the gloo
  async-send keep-alive that makes ``overlap_p2p_comm`` + ``deallocate_pipeline_outputs``
  safe, a CPU stand-in of apex's fused wgrad kernel, CPU state for megatron-core's
  optimizers, the few Transformer Engine names 0.16.1 uses without checking for TE, and
  per-release switches for 0.17 to 0.19).
- ``pool``: ``WorkerPool(world_size)`` and ``session_pool(world_size)``.
- ``gpt``: ``TinyGPTCase`` and the tiny GPTModel factory (layout-independent weights); knobs
  for what real Megatron-LM GPU jobs use (fused wgrad, overlapped grad reduce / param gather,
  distributed optimizer, bf16, Llama-style layers, selective recompute, MoE, variable
  sequence length).
- ``reference``: ``run_case`` (runs in a pool worker; plain SGD or megatron-core's Adam),
  ``merge_ranks``, ``compare_runs``, ``compare_runs_per_rank``.

Importing this package does not import megatron-core; the workers do.
"""
from megatron_offload.testing.cpu_shims import apply_cpu_shims, remove_cpu_shims
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
    "apply_cpu_shims", "remove_cpu_shims", "TinyGPTCase", "WorkerPool",
    "session_pool", "close_session_pools", "WorkerError", "WorkerDied", "PoolTimeout",
    "PoolClosed", "compare_runs", "compare_runs_per_rank", "merge_ranks", "SAFE_FAULT_PP2_M4",
    "RUN_CASE",
]
