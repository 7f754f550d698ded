"""The command line: flags are pinned (none disappears by accident) and `train` runs end to end."""
from __future__ import annotations

import json

import pytest

from megatron_offload import cli

TRAIN_FLAGS = {
    "--nproc", "--device", "--train-iters", "--no-baseline", "--log-dir", "--verbose", "--json",
    "--pipeline-offload", "--offload-policy", "--offload-chunks", "--offload-min-bytes",
    "--offload-backend", "--offload-prefetch", "--offload-host-budget-gib", "--offload-report",
    "--offload-memory-budget-gib", "--offload-memory-budget-scope", "--offload-memory-reserve-gib",
    "--offload-granularity", "--offload-schedule", "--offload-group-size",
}
"""`train` is the launcher with a built-in script: every other flag is Megatron-LM's."""


def _flags(command: str) -> set[str]:
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {opt for action in sub._actions for opt in action.option_strings} - {"-h", "--help"}


def test_train_flags_are_pinned():
    assert _flags("train") == TRAIN_FLAGS


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--offload-policy", "chunks"], "given without --pipeline-offload"),
        (["train", "--pipeline-offload", "--offload-policy", "chunks"], "--offload-chunks"),
        (["train", "--pipeline-offload", "--offload-granularity", "unit", "--offload-prefetch", "0"],
         "--offload-prefetch 0"),
        (["train", "--nproc", "0"], "--nproc 0 must be >= 1"),
        (["train", "--pipeline-offload", "--offload-policy", "auto"], "--offload-memory-budget-gib"),
        (["train", "--device", "cuda"], "--device cuda"),
    ],
)
def test_train_bad_input_fails_before_spawning(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_passes_megatron_flags_through():
    """Unknown flags are Megatron-LM's; the built-in job's defaults fill in the rest."""
    from megatron_offload.cli import train

    parser = cli.build_parser("train")
    args, rest = parser.parse_known_args(["train", "--num-layers", "16", "--pipeline-offload"])
    assert rest == ["--num-layers", "16"]
    argv = train.megatron_argv(args, rest, "cpu")
    assert argv[:2] == ["--num-layers", "16"] and argv.count("--num-layers") == 1
    assert "--distributed-backend" in argv and argv[argv.index("--distributed-backend") + 1] == "gloo"
    assert train.drop_flags(["--save", "d", "--save-interval=5", "--lr", "1"],
                            train.BASELINE_DROPS) == ["--lr", "1"]
    assert train.builtin_script().name == "pretrain_gpt.py"
