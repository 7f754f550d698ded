"""The launcher's checks before start, its flags on Megatron's parser, the pinned flag set.

In-process (one import of megatron.training for the whole module) except the last test,
which spawns ranks to show that bad input stops every rank before torch.distributed starts.
"""
from __future__ import annotations

import argparse

import pytest

from megatron_offload.cli import launch
from megatron_offload.config import ENABLE_FLAG, add_offload_arguments, offload_flags
from megatron_offload.integration import megatron_lm
from megatron_offload.integration.megatron_lm import LaunchError, preflight

from _launch_flags import CPU, SCRIPT

OFFLOAD_FLAGS = {
    "--pipeline-offload", "--offload-policy", "--offload-chunks", "--offload-min-bytes",
    "--offload-backend", "--offload-prefetch", "--offload-host-budget-gib", "--offload-report",
    "--offload-memory-budget-gib", "--offload-memory-budget-scope", "--offload-memory-reserve-gib",
    "--offload-granularity", "--offload-schedule", "--offload-group-size",
}


def test_offload_flags_are_pinned():
    """One definition (OffloadConfig field metadata) for the launcher, train and patches/."""
    assert {ENABLE_FLAG, *offload_flags()} == OFFLOAD_FLAGS
    parser = add_offload_arguments(argparse.ArgumentParser())
    assert OFFLOAD_FLAGS <= set(parser._option_string_actions)


def test_offload_flags_join_megatrons_parser():
    parser = megatron_lm.megatron_parser()
    assert OFFLOAD_FLAGS <= set(parser._option_string_actions)
    assert "--pipeline-model-parallel-size" in parser._option_string_actions


def test_good_command_line_gives_the_config():
    launch_ = preflight(SCRIPT, CPU + [ENABLE_FLAG, "--offload-policy", "chunks",
                                       "--offload-chunks", "1", "--offload-report"])
    assert launch_.config.policy == "chunks" and launch_.config.offload_chunks == 1
    assert launch_.config.measure_memory is True
    assert launch_.config.backend == "cpu"  # no GPU here
    assert launch_.argument_api in ("extra_args_provider", "parse_and_validate_args")
    assert preflight(SCRIPT, CPU).config is None  # no --pipeline-offload: nothing to install


@pytest.mark.parametrize(
    "argv, message",
    [
        (CPU + ["--offload-policy", "full"], "--offload-policy given without --pipeline-offload"),
        (CPU + ["--offload-report", "--offload-chunks", "1"],
         "--offload-chunks, --offload-report given without --pipeline-offload"),
        (CPU + [ENABLE_FLAG, "--cpu-offloading"], "cannot run with --cpu-offloading"),
        (CPU + [ENABLE_FLAG, "--cpu-offloading-num-layers", "2"],
         "cannot run with --cpu-offloading-num-layers"),
        (CPU + [ENABLE_FLAG, "--fine-grained-activation-offloading"],
         "cannot run with --fine-grained-activation-offloading"),
        (CPU + [ENABLE_FLAG, "--overlap-moe-expert-parallel-comm"],
         "--overlap-moe-expert-parallel-comm"),
        (CPU + [ENABLE_FLAG, "--offload-policy", "chunks"], "needs --offload-chunks K"),
        (CPU + [ENABLE_FLAG, "--offload-policy", "chunks", "--offload-chunks", "3",
                "--num-layers", "8", "--pipeline-model-parallel-size", "2",
                "--num-virtual-stages-per-pipeline-rank", "2"], "outside 0..2"),
        (CPU + [ENABLE_FLAG, "--offload-granularity", "unit", "--offload-prefetch", "0"],
         "--offload-prefetch 0 must be >= 1 with --offload-granularity unit"),
        (CPU + [ENABLE_FLAG, "--offload-prefetch", "-1"], "--offload-prefetch -1 must be >= 0"),
        (["--transformer-impl", "local", ENABLE_FLAG], "add --distributed-backend gloo"),
    ],
)
def test_bad_command_line_names_the_flag_and_the_fix(argv, message):
    with pytest.raises(LaunchError, match=message.replace("(", r"\(")):
        preflight(SCRIPT, argv)


def test_unsupported_release_is_refused(monkeypatch):
    monkeypatch.setattr(megatron_lm, "megatron_core_version", lambda: "0.15.3")
    with pytest.raises(LaunchError, match=r"megatron-core 0\.15\.3 is not supported"):
        preflight(SCRIPT, CPU + [ENABLE_FLAG])
    preflight(SCRIPT, CPU)  # without --pipeline-offload the release does not matter


def test_script_that_does_not_exist_or_never_calls_pretrain(tmp_path):
    with pytest.raises(LaunchError, match="does not exist"):
        preflight(tmp_path / "pretrain_gtp.py", CPU + [ENABLE_FLAG])
    script = tmp_path / "train.py"
    script.write_text("from megatron.training import pretrain\nprint('no call')\n")
    with pytest.raises(LaunchError, match=r"never calls megatron.training.pretrain\(...\)"):
        preflight(script, CPU + [ENABLE_FLAG])
    script.write_text("pretrain, store = wrap(pretrain)\npretrain(cfg, data, model, step)\n")
    assert preflight(script, CPU).script == script


def test_checkpoint_writer_dependency_checked_before_start(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psutil" else real(name, *a))
    with pytest.raises(LaunchError, match="pip install psutil, or add --ckpt-format torch"):
        preflight(SCRIPT, CPU + ["--save", "/tmp/x"])
    preflight(SCRIPT, CPU + ["--save", "/tmp/x", "--ckpt-format", "torch"])


def test_help_lists_the_offload_flags(clean_launch, capsys):
    with pytest.raises(SystemExit) as done:
        launch.main([SCRIPT, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "Megatron-LM Arguments" in out or "--pipeline-model-parallel-size" in out
    for flag in OFFLOAD_FLAGS:
        assert flag in out


def test_megatron_still_rejects_unknown_flags(clean_launch, capsys):
    with pytest.raises(SystemExit) as done:
        launch.main([SCRIPT, *CPU, ENABLE_FLAG, "--offload-polcy", "full"])
    assert done.value.code == 2
    assert "unrecognized arguments: --offload-polcy" in capsys.readouterr().err


def test_launcher_bad_input_exit_code_and_message(capsys, tmp_path):
    assert launch.main([str(tmp_path / "missing.py"), ENABLE_FLAG]) == 2
    assert "megatron-offload: error: pretrain script" in capsys.readouterr().err


def test_extra_args_provider_is_chained():
    """For patched scripts: their own provider (Megatron-LM's uses the slot) runs, then ours."""
    calls = []

    def own(parser):
        calls.append("own")
        parser.add_argument("--own-flag")
        return parser

    provider = megatron_lm.with_offload_arguments(own)
    assert megatron_lm.with_offload_arguments(provider) is provider
    parser = provider(argparse.ArgumentParser())
    assert calls == ["own"] and {"--own-flag", ENABLE_FLAG} <= set(parser._option_string_actions)
    assert add_offload_arguments(parser) is parser  # idempotent: no second group



def test_slurm_environment_maps_to_torchrun_names():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert launch.rank_environment(env) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert launch.rank_environment({**env, "RANK": "5"}) == {}  # torchrun in between


@pytest.mark.slow
def test_bad_input_stops_every_rank_before_torch_distributed(tmp_path):
    from megatron_offload.cli.train import RunFailed, _Echo, spawn_run

    argv = [SCRIPT, *CPU, "--num-layers", "2", ENABLE_FLAG, "--fine-grained-activation-offloading"]
    with pytest.raises(RunFailed) as failed:
        spawn_run(argv, 2, "cpu", tmp_path, "bad", _Echo(False, True, 2))
    assert failed.value.code == 2
    assert "--fine-grained-activation-offloading" in failed.value.error_line()
    for rank in (0, 1):
        log = (tmp_path / f"bad-rank{rank}.log").read_text()
        assert "initializing torch distributed" not in log


def test_every_megatron_parse_sees_the_flags(clean_launch, monkeypatch):
    """add_megatron_arguments is looked up by parse_args on every call: the parse inside
    pretrain (0.16/0.17), parse_and_validate_args (0.18+), ft_integration's early parse."""
    from megatron.training import arguments

    megatron_lm.apply(preflight(SCRIPT, CPU))
    monkeypatch.setattr("sys.argv", ["pretrain_gpt.py", *CPU, ENABLE_FLAG, "--offload-report"])
    args = arguments.parse_args(ignore_unknown_args=True)
    assert args.pipeline_offload is True and args.offload_report is True
    megatron_lm.remove()
    assert not hasattr(arguments.parse_args(ignore_unknown_args=True), "pipeline_offload")
