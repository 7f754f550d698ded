"""The CUDA link probe (``runtime/link_probe.py``) refuses a machine without a GPU."""
from __future__ import annotations

import pytest
import torch

from megatron_offload.planning.hardware import measure_device
from megatron_offload.runtime.link_probe import cuda_device_probe


def test_default_probe_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        measure_device(probe=cuda_device_probe, directory=tmp_path, host="cpu-only")
