"""The command line: flags are pinned (none disappears by accident) and `train` runs end to end."""
from __future__ import annotations

import json

import pytest

from megatron_offload import cli

TRAIN_FLAGS = {
    "--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size",
    "--seq-length", "--vocab-size", "--micro-batch-size", "--global-batch-size",
    "--untie-embeddings-and-output-weights", "--recompute-granularity",
    "--pipeline-model-parallel-size", "--pp", "--num-virtual-stages-per-pipeline-rank", "--vpp",
    "--num-layers-per-virtual-pipeline-stage", "--train-iters", "--nproc", "--device", "--seed", "--lr",
    "--no-baseline", "--json", "--pipeline-offload", "--no-pipeline-offload",
    "--offload-policy", "--offload-chunks", "--offload-min-bytes", "--offload-report",
    "--no-offload-report", "--offload-host-budget-gib", "--offload-memory-budget-gib",
}


def _flags(command: str) -> set[str]:
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {opt for action in sub._actions for opt in action.option_strings} - {"-h", "--help"}


def test_train_flags_are_pinned():
    assert _flags("train") == TRAIN_FLAGS


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--offload-policy", "chunks"], "--offload-chunks"),
        (["train", "--offload-policy", "chunks", "--offload-chunks", "3"], "outside 0..2"),
        (["train", "--offload-policy", "auto"], "--offload-memory-budget-gib"),
        (["train", "--num-layers", "6"], "--num-layers 6 must divide"),
        (["train", "--pp", "3"], "must divide --nproc"),
        (["train", "--device", "cuda"], "--device cuda"),
    ],
)
def test_train_bad_input_fails_before_spawning(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_train_runs_end_to_end(capsys):
    code = cli.main(["train", "--train-iters", "2", "--hidden-size", "64", "--seq-length", "32", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["bitwise_identical_to_baseline"] is True
    assert len(result["losses"]) == 2 and len(result["grad_norms"]) == 2
    with_offload, without = result["peak_activation_bytes"], result["baseline_peak_activation_bytes"]
    assert all(a < b for a, b in zip(with_offload, without))
    assert without == sorted(without, reverse=True)  # rank 0 holds the most
    assert all(b > 0 for b in result["offloaded_bytes"])
