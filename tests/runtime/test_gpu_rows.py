"""The realistic matrix's GPU rows (``gpu_rows.py``) on CPU: row ``local_fp32`` runs here.

Megatron-core GPTModel chunks in DDP with ``overlap_grad_reduce`` and fused wgrad accumulation,
rank 0's interleaved order (PP=4 VPP=2, m=8), Adam between 3 iterations; without vs with the
offloader, bitwise. The TE rows need CUDA and say so.
"""
import contextlib

import pytest
import torch

from megatron_offload.gpu_check import check as gpu_check
from megatron_offload.gpu_check import rows as gpu_rows

CPU = torch.device("cpu")


def run_local_row():
    (row,) = gpu_rows.run_rows(CPU, gpu_rows.SMALL, names=("local_fp32",))
    return row


@pytest.fixture(scope="module")
def local_row():
    return run_local_row()


def test_local_fp32_row_is_bitwise_identical_with_full_offload(local_row):
    row = local_row
    assert "error" not in row, row.get("traceback")
    assert row["bitwise_identical"], row["differences"]
    assert row["iterations"] == 3
    assert all(b > 0 for b in row["offloaded_bytes"])
    assert row["offloaded_bytes"] == row["reloaded_bytes"]
    # every unit with a lifespan moved: 16 forwards, minus the one whose backward follows it
    assert all(n >= 14 for n in row["offloaded_units"]), row["offloaded_units"]
    assert len(set(row["host_pool_bytes"])) == 1
    assert row["step_ok"] == [True, True, True]
    # the optimizer really stepped between iterations: the losses move
    assert row["losses"][0] != row["losses"][1] != row["losses"][2]
    assert len(row["losses"][0]) == gpu_rows.MICROBATCHES
    assert row["wgrad_kernel"].startswith("stand-in")
    assert gpu_check.problems({"device": "cpu", "rows": [row]}) == []


def test_local_fp32_layers_row_streams_layers_bitwise():
    """The same row at layer granularity (what scripts/gpu_check.sh runs on a GPU too)."""
    (row,) = gpu_rows.run_rows(CPU, gpu_rows.SMALL, names=("local_fp32_layers",))
    assert "error" not in row, row.get("traceback")
    assert row["granularity"] == "layer"
    assert row["bitwise_identical"], row["differences"]
    assert all(b > 0 for b in row["offloaded_bytes"])
    assert row["offloaded_bytes"] == row["reloaded_bytes"]
    assert gpu_check.problems({"device": "cpu", "rows": [row]}) == []


def test_local_row_fails_when_a_host_buffer_is_zeroed_before_reload(monkeypatch):
    from megatron_offload.runtime import transfer

    original = transfer.CpuTransferBackend.host_to_device

    def corrupting(self, pairs, after=None):
        for _, host in pairs:
            host.zero_()
        return original(self, pairs, after)

    monkeypatch.setattr(transfer.CpuTransferBackend, "host_to_device", corrupting)
    row = run_local_row()
    assert row["bitwise_identical"] is False
    assert row["differences"]
    found = gpu_check.problems({"device": "cpu", "rows": [row]})
    assert any("not bitwise identical" in p for p in found), found


def test_local_row_needs_parameters_saved_as_themselves(monkeypatch):
    """Without the runtime keeping saved Parameters as themselves, Megatron's fused
    wgrad never flags the real Parameter and DDP's overlap_grad_reduce hook asserts."""
    from megatron_offload.runtime import offloader

    monkeypatch.setattr(offloader, "preserve_saved_parameters", contextlib.nullcontext)
    row = run_local_row()
    assert "param.grad being None is not safe when overlap_grad_reduce is True" in row["error"]
    assert any("raised" in p for p in gpu_check.problems({"device": "cpu", "rows": [row]}))


def test_cuda_rows_say_why_they_did_not_run_on_cpu():
    rows = gpu_rows.run_rows(CPU, gpu_rows.SMALL, names=("te_bf16_rope", "te_fp8"))
    assert [r["row"] for r in rows] == ["te_bf16_rope", "te_fp8"]
    assert all("needs CUDA" in r["not_run"] for r in rows)
    assert rows[1]["fp8"] == "hybrid/delayed" and rows[0]["rope_fusion"]
    report = {"device": "cpu", "rows": rows}
    assert gpu_check.problems(report) == []
    assert gpu_check.exit_status(report) == gpu_check.EXIT_INCOMPLETE  # not a pass


def _process_state():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers
    from torch.autograd.function import BackwardCFunction

    from megatron_offload.integration.cpu import core as cpu_shims

    return {
        "process group": dist.is_initialized(),
        "parallel state": parallel_state.model_parallel_is_initialized(),
        "cpu shims": cpu_shims.cpu_shims_applied(),
        "fusion available": layers._grad_accum_fusion_available,
        "fused module": layers.__dict__.get("fused_weight_gradient_mlp_cuda"),
        "saved_tensors patch": "saved_tensors" in BackwardCFunction.__dict__,
        "torch.cuda.current_device": torch.cuda.current_device,
    }


def test_rows_leave_the_process_as_they_found_it():
    before = _process_state()
    assert not before["parallel state"]
    run_local_row()
    assert _process_state() == before


def test_fused_wgrad_stand_in_is_bound_only_while_the_extension_is_missing():
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        pytest.skip("a fused wgrad kernel (apex, or CPU shims left applied) is already bound")
    with gpu_rows.fused_wgrad_kernel() as kernel:
        assert "apex extension missing" in kernel
        assert layers._grad_accum_fusion_available is True
        main_grad = torch.zeros(3, 4)
        x, g = torch.randn(5, 4), torch.randn(5, 3)
        layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(x, g, main_grad)
        torch.testing.assert_close(main_grad, g.t() @ x)
    assert layers._grad_accum_fusion_available is False
    assert "fused_weight_gradient_mlp_cuda" not in layers.__dict__
