"""The GPU check's code path on the CPU backend (the streams are the only part not run here)."""
import torch

from megatron_offload import gpu_check


def test_gpu_check_runs_on_cpu_and_is_exact():
    report = gpu_check.run_checks(torch.device("cpu"), small=True)
    assert report["link"]["copies_bitwise_ok"]
    (check,) = report["checks"]
    assert check["bitwise_identical"]
    assert check["offloaded_bytes_per_iteration"] > 0
    assert len(set(check["host_pool_bytes"])) == 1  # pool sized in iteration 0, then reused
    assert "bitwise" in gpu_check.format_report(report)


def test_single_rank_driver_follows_megatron_rank0_order():
    from megatron_offload.testing.single_rank import interleaved_rank0_order

    order = interleaved_rank0_order(4, 2, 8)
    text = " ".join(map(str, order))
    # warm-up: 2 (p - 1) + (v - 1) g = 10 forwards, then 1F1B pairs
    assert text.startswith("0F0 0F1 0F2 0F3 1F0 1F1 1F2 1F3 0F4 0F5 0F6 1B0 0F7 1B1")
    assert len(order) == 32
