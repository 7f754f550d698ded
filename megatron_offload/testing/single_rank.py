"""Moved to the product: :mod:`megatron_offload.runtime.single_rank` (the GPU check drives one
pipeline rank's order with it). This name stays as an alias of that very module."""
import sys

from megatron_offload.runtime import single_rank as _single_rank

sys.modules[__name__] = _single_rank
