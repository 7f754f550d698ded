"""Megatron-LM's real pretrain() with --offload-schedule gis: the executor replaces Megatron's
interleaved function inside train(), transparently. One ``megatron-offload train`` command
runs the baseline (Megatron's own interleaved schedule, policy none) and then gis with group
size 2 and full offload; losses and grad norms of every iteration must be bitwise identical,
every rank's peak activation bytes far lower, and evaluate()'s validation losses the same."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from megatron_offload import cli

from _launch_flags import SMALL

pytestmark = pytest.mark.slow


def test_pretrain_runs_gis_through_train_bitwise():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["train", "--json", "--train-iters", "3", "--eval-interval", "2",
                         "--eval-iters", "1", *SMALL, "--pipeline-offload",
                         "--offload-policy", "full", "--offload-schedule", "gis",
                         "--offload-group-size", "2"])
    assert code == 0, out.getvalue()
    result = json.loads(out.getvalue())
    assert result["bitwise_identical_to_baseline"] is True
    assert len(result["losses"]) == 3
    for with_gis, megatron in zip(result["peak_activation_bytes"],
                                  result["baseline_peak_activation_bytes"]):
        assert with_gis * 3 < megatron
    # evaluate() (forward-only calls) runs the executor's forwards: Megatron's printed
    # validation losses, to all digits it prints, are those of the baseline
    logs = Path(result["log_dir"])

    def validation(run: str) -> list[str]:
        text = (logs / f"{run}-rank3.log").read_text()
        return [line.split("|")[1] for line in text.splitlines() if "validation loss" in line]

    assert len(validation("offload")) == 3
    assert validation("offload") == validation("baseline")
