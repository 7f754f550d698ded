"""Moved to the product: :mod:`megatron_offload.integration.cpu.core` (running Megatron on a
CPU-only machine is a feature, not only a test aid). This name stays as an alias of that very
module, so ``megatron_offload.testing.cpu_shims`` and ``megatron_offload.integration.cpu.core``
share one patch registry and every existing import keeps working."""
import sys

from megatron_offload.integration.cpu import core as _core

sys.modules[__name__] = _core
