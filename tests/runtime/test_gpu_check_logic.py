"""The GPU check's code path on the CPU backend, and its verdict on synthetic reports.

The streams and device memory are the only part not run here; the verdict (``problems``) is a
pure function of the report, so every CUDA failure it must catch is tested with a made-up
CUDA report.
"""
import copy

import pytest
import torch

from megatron_offload.gpu_check import check as gpu_check


@pytest.fixture(scope="module")
def cpu_report():
    return gpu_check.run_checks(torch.device("cpu"), small=True)


def test_gpu_check_runs_on_cpu_and_passes(cpu_report):
    report = cpu_report
    assert report["link"]["copies_bitwise_ok"]
    assert report["problems"] == [] == gpu_check.problems(report)
    (check,) = report["checks"]
    assert check["bitwise_identical"]
    assert all(b > 0 for b in check["offloaded_bytes"])
    assert check["offloaded_bytes"] == check["reloaded_bytes"]
    assert len(set(check["host_pool_bytes"])) == 1  # pool sized in iteration 0, then reused
    rows = {row["row"]: row for row in report["rows"]}
    assert rows["local_fp32"]["bitwise_identical"]
    assert all(b > 0 for b in rows["local_fp32"]["offloaded_bytes"])
    # The CUDA-only rows say why they did not run; that is reported, and is not a pass.
    te_rows = {"te_bf16_rope", "te_fp8", "te_bf16_rope_layers"}
    assert all("not_run" in rows[name] for name in te_rows)
    assert len(report["not_run"]) == len(te_rows)
    assert rows["local_fp32_layers"]["bitwise_identical"]
    assert gpu_check.exit_status(report) == gpu_check.EXIT_INCOMPLETE == 3
    assert gpu_check.exit_status(report, allow_not_run=True) == 0
    text = gpu_check.format_report(report)
    assert "bitwise" in text and "NOT RUN" in text and "local_fp32" in text


def _cuda_entry(**changes) -> dict:
    entry = {
        "name": "torch_float32", "flavor": "torch", "dtype": "float32",
        "bitwise_identical": True,
        "offloaded_bytes": [100 << 20, 120 << 20, 120 << 20],
        "reloaded_bytes": [100 << 20, 120 << 20, 120 << 20],
        "host_pool_bytes": [128 << 20] * 3,
        "host_pool_pinned_bytes": [128 << 20] * 3,
        "peak_bytes_without": 900 << 20, "peak_bytes_with": 400 << 20,
        "time_s_without": 1.0, "time_s_with": 1.1,
    }
    entry.update(changes)
    return entry


def _cuda_report(*entries) -> dict:
    return {
        "device": "cuda:0", "torch": "x", "gpu": "H200",
        "link": {"bytes": 1 << 30, "d2h_gbps": 50.0, "h2d_gbps": 50.0,
                 "duplex_gbps_each_way": 40.0, "copies_bitwise_ok": True},
        "checks": list(entries or [_cuda_entry()]), "rows": [],
    }


def test_a_synthetic_cuda_report_that_frees_memory_passes():
    report = _cuda_report()
    assert gpu_check.problems(report) == []
    assert gpu_check.exit_status(report) == 0
    assert "PASS" in gpu_check.format_report(report)


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(peak_bytes_with=900 << 20), "memory not freed"),  # equal: nothing freed
        (dict(peak_bytes_with=950 << 20), "memory not freed"),
        (dict(peak_bytes_with=None), "not measured"),
        (dict(bitwise_identical=False), "not bitwise identical"),
        (dict(reloaded_bytes=[100 << 20, 80 << 20, 120 << 20]), "reloaded"),
        (dict(reloaded_bytes=[100 << 20]), "reloaded None"),
        (dict(offloaded_bytes=[0, 0, 0], reloaded_bytes=[0, 0, 0]), "offloaded nothing"),
        (dict(offloaded_bytes=[], reloaded_bytes=[]), "no offload statistics"),
        (dict(host_pool_bytes=[128 << 20, 192 << 20, 192 << 20],
              host_pool_pinned_bytes=[128 << 20, 192 << 20, 192 << 20]), "grew"),
        (dict(host_pool_pinned_bytes=[64 << 20] * 3), "pinned"),
        (dict(step_ok=[True, False, True]), "optimizer step"),
    ],
)
def test_synthetic_cuda_reports_that_must_fail(changes, expected):
    report = _cuda_report(_cuda_entry(**changes))
    found = gpu_check.problems(report)
    assert any(expected in p for p in found), found
    assert gpu_check.exit_status(report) == 1
    assert "FAIL" in gpu_check.format_report(report)


def test_cpu_verdict_checks_bytes_but_not_device_memory(cpu_report):
    report = copy.deepcopy(cpu_report)
    assert gpu_check.problems(report) == []  # no peak, no pinning on CPU: not required
    report["checks"][0]["reloaded_bytes"][1] -= 4096
    assert any("reloaded" in p for p in gpu_check.problems(report))
    report = copy.deepcopy(cpu_report)
    report["rows"][0]["offloaded_bytes"] = [0, 0, 0]
    report["rows"][0]["reloaded_bytes"] = [0, 0, 0]
    assert any("offloaded nothing" in p for p in gpu_check.problems(report))
    report = copy.deepcopy(cpu_report)
    report["rows"][0]["bitwise_identical"] = False
    assert any("local_fp32" in p and "bitwise" in p for p in gpu_check.problems(report))


def test_errors_and_broken_links_fail_and_not_run_is_not_a_pass():
    raised = _cuda_report(_cuda_entry(), {"row": "te_bf16_rope", "error": "RuntimeError: boom"})
    assert any("raised RuntimeError: boom" in p for p in gpu_check.problems(raised))
    broken = _cuda_report()
    broken["link"]["copies_bitwise_ok"] = False
    assert any("link" in p for p in gpu_check.problems(broken))
    skipped = _cuda_report(_cuda_entry(), {"row": "te_fp8", "not_run": "FP8 not supported"})
    assert gpu_check.problems(skipped) == []
    assert gpu_check.not_run(skipped) == ["te_fp8: FP8 not supported"]
    assert gpu_check.exit_status(skipped) == gpu_check.EXIT_INCOMPLETE
    assert "NOT RUN (not a pass): te_fp8" in gpu_check.format_report(skipped)
    empty = _cuda_report()
    empty["checks"] = []
    assert gpu_check.problems(empty) == ["nothing was checked"]


def test_single_rank_driver_follows_megatron_rank0_order():
    from megatron_offload.runtime.single_rank import interleaved_rank0_order

    order = interleaved_rank0_order(4, 2, 8)
    text = " ".join(map(str, order))
    # warm-up: 2 (p - 1) + (v - 1) g = 10 forwards, then 1F1B pairs
    assert text.startswith("0F0 0F1 0F2 0F3 1F0 1F1 1F2 1F3 0F4 0F5 0F6 1B0 0F7 1B1")
    assert len(order) == 32
