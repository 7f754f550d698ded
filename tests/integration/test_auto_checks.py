"""Policy auto's checks that need no ranks: what it refuses, the device-scope arithmetic."""
from __future__ import annotations

import types

import pytest
import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.integration import auto
from megatron_offload.planning.costmodel import GiB
from megatron_offload.planning.job import JobSpec


@pytest.mark.parametrize("field, value, flag", [
    ("num_moe_experts", 8, "--num-experts"),
    ("multi_latent_attention", True, "--multi-latent-attention"),
    ("mtp_num_layers", 1, "--mtp-num-layers"),
    ("num_layers_in_first_pipeline_stage", 3, "--decoder-first-pipeline-num-layers"),
    ("pipeline_model_parallel_layout", "Et|tL", "--pipeline-model-parallel-layout"),
    ("fp8", "hybrid", "--fp8-format"),
])
def test_what_the_cost_model_does_not_describe_is_refused(field, value, flag):
    config = types.SimpleNamespace(**{field: value})
    with pytest.raises(ValueError, match=flag) as info:
        auto.refuse_unmodelled(config)
    assert "--offload-policy full" in str(info.value)
    auto.refuse_unmodelled(types.SimpleNamespace(num_moe_experts=None, mtp_num_layers=0, fp8=None))


def test_device_budget_subtracts_the_larger_static_working_and_reserve():
    left = auto.device_activation_budget(80 * GiB, allocated_bytes=20 * GiB,
                                         static_predicted_bytes=30 * GiB,
                                         working_bytes_=1 * GiB, reserve_bytes=2 * GiB)
    assert left == 47 * GiB  # Adam's moments not allocated yet: the prediction counts them
    left = auto.device_activation_budget(80 * GiB, allocated_bytes=33 * GiB,
                                         static_predicted_bytes=30 * GiB,
                                         working_bytes_=1 * GiB, reserve_bytes=2 * GiB)
    assert left == 44 * GiB  # more allocated than predicted: what is there counts


def test_device_scope_on_a_cpu_model_names_the_flag():
    config = OffloadConfig(policy="auto", memory_budget_gib=10, memory_budget_scope="device")
    job = JobSpec(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32)
    with pytest.raises(ValueError, match="--offload-memory-budget-scope activations"):
        auto._activation_budgets(config, job, [torch.nn.Linear(2, 2)], 0, None)
