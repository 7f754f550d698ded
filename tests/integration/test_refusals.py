"""The refusal table (integration/refusals.py): one row per mode, read by the launcher's
pre-flight and by the patched schedules alike."""
from __future__ import annotations

import argparse
import types

import pytest

from megatron_offload.integration.refusals import (
    MODES,
    REFUSED_MODES,
    launch_problem,
    problems,
    refuse_for_gis,
    refuse_unsupported,
)
from megatron_offload.releases import RELEASES, SUPPORTED_MINORS


def test_every_row_is_documented_and_checked():
    for mode in REFUSED_MODES:
        assert mode.flags and mode.reason and mode.fix and mode.problem, mode.key
        assert set(mode.releases) <= set(SUPPORTED_MINORS) and mode.releases, mode.key
        assert mode.fields or mode.detect, mode.key
    assert MODES["moe_paged_stash"].releases == (18, 19)


@pytest.mark.parametrize("mode", [m for m in REFUSED_MODES if m.fields and m.detect is None],
                         ids=lambda m: m.key)
def test_each_field_switches_its_row_on(mode):
    facts = RELEASES[max(mode.releases)]
    for field in mode.fields:
        config = types.SimpleNamespace(**{field: True})
        assert problems(config, facts, kinds=(mode.kind,)) == [mode.problem]
        if mode.kind == "gis":
            with pytest.raises(ValueError, match="^--offload-schedule gis cannot run with: "):
                refuse_for_gis(config, facts, {})
        else:
            with pytest.raises(ValueError, match="^--pipeline-offload cannot run with: "):
                refuse_unsupported(config, facts)


@pytest.mark.parametrize("arg", [a for m in REFUSED_MODES for a in m.args])
def test_each_megatron_lm_argument_is_refused_before_start(arg):
    flag = "--" + arg.replace("_", "-")
    value = "local" if arg == "cuda_graph_impl" else 2 if arg.endswith("num_layers") else True
    message = launch_problem(argparse.Namespace(**{arg: value}))
    assert message.startswith(f"--pipeline-offload cannot run with {flag}")
    off = "none" if arg == "cuda_graph_impl" else 0 if arg.endswith("num_layers") else False
    assert launch_problem(argparse.Namespace(**{arg: off})) is None


def test_the_launcher_names_another_owner_of_the_saved_tensor_hooks_first():
    args = argparse.Namespace(overlap_moe_expert_parallel_comm=True, moe_paged_stash=True)
    assert "--moe-paged-stash" in launch_problem(args)
    assert launch_problem(argparse.Namespace()) is None
