"""Megatron-LM's real pretrain() through the launcher on CPU: 4 gloo ranks, PP=4 x VPP=2, 20
iterations, mock data, Megatron's Adam, DDP and checkpoints.

Three jobs of four processes each, run once for the module through ``megatron-offload train``
(which spawns the launcher): ``--offload-policy none`` (the hooks measure, nothing moves) and
``full`` with a checkpoint every 10 iterations (one command: the baseline comparison is
built in), then ``full`` again resumed from the iteration-10 checkpoint. Megatron's global
state (args, process groups, microbatch calculator) allows one pretrain() per process, so the
jobs cannot share processes.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from megatron_offload import cli

from _launch_flags import SMALL

pytestmark = pytest.mark.slow

ITERS = 20


def _train(*argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["train", "--json", "--train-iters", str(ITERS), *SMALL, *argv])
    assert code == 0, out.getvalue()
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{'full': none-then-full job with checkpoints, 'resumed': full from iteration 10}."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    logs = tmp_path_factory.mktemp("logs")
    full = _train("--pipeline-offload", "--offload-policy", "full",
                  "--save", str(ckpt), "--save-interval", "10", "--ckpt-format", "torch",
                  "--log-dir", str(logs / "full"))
    resumed = _train("--pipeline-offload", "--offload-policy", "full", "--no-baseline",
                     "--load", str(ckpt), "--ckpt-step", "10", "--ckpt-format", "torch",
                     "--log-dir", str(logs / "resumed"))
    return {"full": full, "resumed": resumed, "logs": logs}


def test_json_has_the_contract_keys(runs):
    result = runs["full"]
    for key in ("losses", "grad_norms", "peak_activation_bytes", "offloaded_bytes",
                "iteration_time_s"):
        assert key in result
    assert len(result["losses"]) == len(result["grad_norms"]) == ITERS
    assert len(result["peak_activation_bytes"]) == len(result["offloaded_bytes"]) == 4
    assert result["pipeline_parallel_size"] == 4 and result["virtual_pipeline_size"] == 2
    assert result["offload"]["policy"] == "full"


def test_offload_full_vs_none_bitwise_every_iteration(runs):
    result = runs["full"]
    assert result["bitwise_identical_to_baseline"] is True, result["mismatches"]
    assert result["iterations"] == list(range(1, ITERS + 1))
    assert result["losses"][-1] < result["losses"][0]  # it trains


def test_offload_lowers_the_measured_peak_on_every_rank(runs):
    result = runs["full"]
    without, with_ = result["baseline_peak_activation_bytes"], result["peak_activation_bytes"]
    assert all(0 < a < b for a, b in zip(with_, without)), (with_, without)
    assert without == sorted(without, reverse=True)  # rank 0 holds the most units
    assert all(moved > 0 for moved in result["offloaded_bytes"])
    assert result["offloaded_bytes"] == result["reloaded_bytes"]


def test_resume_from_iteration_10_reproduces_11_to_20_bitwise(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert resumed["iterations"] == list(range(11, ITERS + 1))
    assert resumed["losses"] == full["losses"][10:]
    assert resumed["grad_norms"] == full["grad_norms"][10:]


def test_megatron_log_lines_and_offload_figures(runs):
    log = (runs["logs"] / "full" / "offload-rank3.log").read_text()
    plan = (runs["logs"] / "full" / "offload-rank0.log").read_text()
    assert "> pipeline offload plan: policy full, interleaved PP=4 VPP=2, 8 microbatches" in plan
    assert ">   pp rank 0: 16 units, 16 offloaded, peak units in flight 11 -> 2" in plan
    assert "d2h   |" in plan  # the schedule picture with its offload lanes
    for i in (1, 10, ITERS):
        assert f" iteration {i:8d}/{ITERS:8d} | consumed samples:" in log  # Megatron's own
        for rank in range(4):
            assert f" [pipeline offload] iteration {i:8d}/{ITERS:8d} | pp rank {rank} |" in log
    assert ("saved checkpoint from iteration      10" in plan
            or "saving checkpoint at iteration      10" in plan)
