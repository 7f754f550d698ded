"""megatron-offload: PipeOffload (activation offload for pipeline parallelism) on Megatron-Core.

Layers, from mechanism to product (see docs/architecture.md): ``schedule`` and ``planning``
(pure Python, no torch) -> ``runtime`` (hooks, transfers) -> ``integration`` (Megatron
patches) -> ``cli``.
"""

__version__ = "0.1.0"
