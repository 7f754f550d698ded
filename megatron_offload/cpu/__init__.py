"""Running Megatron on a CPU-only machine (demos, CI, laptops): a product feature.

- ``core``: reversible shims that let megatron-core's model, schedules, p2p and optimizers run
  without CUDA on gloo (``apply_cpu_shims`` / ``remove_cpu_shims``).
"""
