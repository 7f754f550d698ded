"""The command line: bad `train` input fails before any rank is spawned (it resolves the
device through torch; the torch-free flag tests are in `tests/test_cli_flags.py`)."""
from __future__ import annotations

import pytest

from megatron_offload import cli


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--offload-policy", "chunks"], "given without --pipeline-offload"),
        (["train", "--pipeline-offload", "--offload-policy", "chunks"], "--offload-chunks"),
        (["train", "--pipeline-offload", "--offload-granularity", "unit",
          "--offload-prefetch", "0"],
         "--offload-prefetch 0"),
        (["train", "--nproc", "0"], "--nproc 0 must be >= 1"),
        (["train", "--pipeline-offload", "--offload-policy", "auto"],
         "--offload-memory-budget-gib"),
        (["train", "--device", "cuda"], "--device cuda"),
    ],
)
def test_train_bad_input_fails_before_spawning(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
