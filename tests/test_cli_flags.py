"""The command line without torch: `train`'s flags are pinned (none disappears by accident)
and Megatron-LM's flags pass through to the built-in job. `tests/test_cli.py` runs `train`
(it needs torch)."""
from __future__ import annotations

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


def test_train_passes_megatron_flags_through():
    """Unknown flags are Megatron-LM's; the built-in job's defaults fill in the rest."""
    from megatron_offload.cli import train

    parser = cli.build_parser("train")
    args, rest = parser.parse_known_args(["train", "--num-layers", "16", "--pipeline-offload"])
    assert rest == ["--num-layers", "16"]
    argv = train.megatron_argv(args, rest, "cpu")
    assert argv[:2] == ["--num-layers", "16"] and argv.count("--num-layers") == 1
    assert ("--distributed-backend" in argv
            and argv[argv.index("--distributed-backend") + 1] == "gloo")
    assert train.drop_flags(["--save", "d", "--save-interval=5", "--lr", "1"],
                            train.BASELINE_DROPS) == ["--lr", "1"]
    assert train.builtin_script().name == "pretrain_gpt.py"
