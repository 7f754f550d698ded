"""megatron-offload: PipeOffload (activation offload for pipeline parallelism) on Megatron-Core.

Layers, from mechanism to product (``docs/architecture.md``; ``tests/test_layering.py`` checks
the direction): ``releases`` and ``config`` (the foundation) -> ``schedule`` (pure Python IR,
generators, passes, simulators) -> ``planning`` (cost model, hardware, planner, policy; pure) and
``runtime`` (hooks, transfers, offloader, executor; torch) -> ``integration`` (Megatron patches,
CPU support) -> ``cli`` (the commands); ``gpu_check`` and ``testing`` stand on all of it.
"""

__version__ = "0.1.0"
