"""megatron-core 0.16.x to 0.19.x: the version check, the per-release facts against the
installed source, and every refused mode, on config objects shaped like each release's.

Runs on every environment (CI: 0.19.2 and 0.16.1; scripts/check_megatron_versions.sh: 0.17.1
and 0.18.2), so the fact table is checked against the real source of each release it names.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import types

import pytest
import torch

from megatron_offload import releases
from megatron_offload.config import OffloadConfig
from megatron_offload.integration import megatron_core
from megatron_offload.releases import RELEASES, release

INSTALLED = release()


# ------------------------------------------------------------------------- version check
@pytest.mark.parametrize("version", ["0.16.0", "0.16.1", "0.17.0", "0.17.1", "0.18.2", "0.19.0",
                                     "0.19.2", "0.19.3rc1", "0.18.0.dev0"])
def test_supported_versions_are_accepted(version):
    assert releases.check_megatron_version(version) == version
    assert release(version).minor == int(version.split(".")[1])


@pytest.mark.parametrize("version", ["0.15.2", "0.15.0", "0.20.0", "0.20.0rc0", "1.0.0",
                                     "0.9.0", "0.160.0", "garbage"])
def test_unsupported_versions_are_refused_with_the_range(version):
    with pytest.raises(ValueError) as info:
        releases.check_megatron_version(version)
    message = str(info.value)
    assert f"megatron-core {version} is not supported" in message
    assert "0.16.x to 0.19.x" in message and ">=0.16,<0.20" in message
    assert "--pipeline-offload" in message


def test_install_checks_the_installed_version_once_before_patching(monkeypatch):
    from megatron.core.pipeline_parallel import schedules

    calls = []

    def fake_version():
        calls.append(1)
        return "0.20.0"

    monkeypatch.setattr(releases, "installed_megatron_version", fake_version)
    before = schedules.forward_step
    with pytest.raises(ValueError, match=r"0\.20\.0 is not supported.*>=0\.16,<0\.20"):
        megatron_core.install(OffloadConfig(policy="full"))
    assert schedules.forward_step is before and calls == [1]
    monkeypatch.undo()
    runtime = megatron_core.install(OffloadConfig(policy="full"))
    try:
        assert runtime.release is INSTALLED
    finally:
        megatron_core.uninstall()


# ----------------------------------------------------- the fact table vs. the installed source
def test_installed_release_facts_match_its_source():
    """Every fact of the installed release's row, read again from the installed wheel."""
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    interleaved = inspect.getsource(schedules.forward_backward_pipelining_with_interleaving)
    grad_sync = inspect.getsource(param_and_grad_buffer._ParamAndGradBucketGroup.start_grad_sync)
    unconditional_stream = any(
        line.strip().startswith("current_stream = torch.cuda.current_stream()")
        for line in grad_sync.splitlines())
    observed = dict(
        minor=int(releases.installed_megatron_version().split(".")[1]),
        backward_step_takes_model_type=(
            "model_type" in inspect.signature(schedules.backward_step).parameters),
        multimodule_pipelines=hasattr(schedules, "backward_step_multimodule"),
        moe_paged_stash="moe_paged_stash" in fields
        and "moe_expert_rank_capacity_factor" in fields,
        full_iteration_graph_field=(
            "cuda_graph_impl" if "full_iteration" in str(fields["cuda_graph_impl"].type)
            else "cuda_graph_scope"),
        interleaved_waits_on_sends=(
            "send_next_wait_handle is not None and config.deallocate_pipeline_outputs"
            in interleaved),
        checkpoint_without_output_shares_storage=hasattr(mcore_random, "_get_share_storage"),
        grad_sync_reads_current_stream=unconditional_stream,
        getter_takes_schedule_pg_collection=(
            "schedule_pg_collection" in inspect.signature(schedules.get_forward_backward_func)
            .parameters),
        ships_megatron_training=importlib.util.find_spec("megatron.training") is not None,
    )
    assert dataclasses.asdict(INSTALLED) == observed


def test_fact_table_covers_exactly_the_supported_range():
    assert sorted(RELEASES) == [16, 17, 18, 19]
    assert all(RELEASES[m].minor == m for m in RELEASES)


# ------------------------------------------------------------------------ refused modes
# The refusal-relevant TransformerConfig defaults of each release, read from its
# transformer_config.py / model_parallel_config.py (fields absent from a release are absent
# here too). Each case below switches one mode on in the release(s) that have it.
_COMMON = dict(overlap_moe_expert_parallel_comm=False, hybrid_context_parallel=False,
               enable_cuda_graph=False, external_cuda_graph=False, cuda_graph_impl="none",
               cpu_offloading=False, fine_grained_activation_offloading=False)
SHAPES = {
    16: dict(_COMMON, cuda_graph_scope="full"),
    17: dict(_COMMON, cuda_graph_scope="full"),
    18: dict(_COMMON, cuda_graph_scope=None, moe_paged_stash=False,
             moe_expert_rank_capacity_factor=None),
    19: dict(_COMMON, cuda_graph_scope=None, moe_paged_stash=False,
             moe_expert_rank_capacity_factor=None),
}

MODES = [
    # (id, releases that have the mode, fields switched on, the flag the error must name)
    ("a2a-overlap", (16, 17, 18, 19), dict(overlap_moe_expert_parallel_comm=True),
     "--overlap-moe-expert-parallel-comm"),
    ("hybrid-cp", (16, 17, 18, 19), dict(hybrid_context_parallel=True),
     "--hybrid-context-parallel"),
    ("full-iteration-scope", (16, 17),
     dict(cuda_graph_impl="local", cuda_graph_scope=["full_iteration"]),
     "--cuda-graph-scope full_iteration"),
    ("full-iteration-impl", (18, 19), dict(cuda_graph_impl="full_iteration"),
     "--cuda-graph-impl full_iteration"),
    ("cuda-graph-local", (16, 17, 18, 19), dict(cuda_graph_impl="local"), "--cuda-graph-impl"),
    ("cuda-graph-te", (16, 17, 18, 19), dict(cuda_graph_impl="transformer_engine"),
     "--cuda-graph-impl"),
    ("enable-cuda-graph", (16, 17, 18, 19), dict(enable_cuda_graph=True), "--enable-cuda-graph"),
    ("external-cuda-graph", (16, 17, 18, 19), dict(external_cuda_graph=True),
     "--external-cuda-graph"),
    ("cpu-offloading", (16, 17, 18, 19), dict(cpu_offloading=True), "--cpu-offloading"),
    ("fine-grained-offloading", (16, 17, 18, 19), dict(fine_grained_activation_offloading=True),
     "--fine-grained-activation-offloading"),
    ("paged-stash", (18, 19),
     dict(moe_paged_stash=True, moe_expert_rank_capacity_factor=1.25), "--moe-paged-stash"),
    ("rank-capacity-factor", (18, 19), dict(moe_expert_rank_capacity_factor=1.25),
     "--moe-expert-rank-capacity-factor"),
]
CASES = [pytest.param(minor, fields, flag, id=f"0.{minor}-{name}")
         for name, minors, fields, flag in MODES for minor in minors]


@pytest.mark.parametrize("minor", sorted(SHAPES))
def test_each_release_default_config_is_accepted(minor):
    megatron_core.refuse_unsupported(types.SimpleNamespace(**SHAPES[minor]), RELEASES[minor])


@pytest.mark.parametrize("minor, fields, flag", CASES)
def test_mode_is_refused_naming_the_flag_and_the_fix(minor, fields, flag):
    config = types.SimpleNamespace(**dict(SHAPES[minor], **fields))
    with pytest.raises(ValueError) as info:
        megatron_core.refuse_unsupported(config, RELEASES[minor])
    message = str(info.value)
    assert message.startswith("--pipeline-offload cannot run with: ")
    assert flag in message
    assert "drop" in message  # the fix


def test_scope_full_iteration_without_a_local_graph_is_not_a_graph():
    # 0.16/0.17 build a whole-iteration graph only with cuda_graph_impl="local"
    config = types.SimpleNamespace(**dict(SHAPES[16], cuda_graph_scope=["full_iteration"]))
    megatron_core.refuse_unsupported(config, RELEASES[16])


def _real_config(**fields):
    """A TransformerConfig of the installed release with ``fields`` set after validation
    (Megatron's own checks want GPUs / TE / other flags for several of these modes)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    for name, value in fields.items():
        assert hasattr(config, name), f"0.{INSTALLED.minor} has no TransformerConfig.{name}"
        setattr(config, name, value)
    return config


INSTALLED_CASES = [pytest.param(fields, flag, id=name)
                   for name, minors, fields, flag in MODES if INSTALLED.minor in minors]


def test_installed_release_default_config_is_accepted():
    megatron_core.refuse_unsupported(_real_config())


@pytest.mark.parametrize("fields, flag", INSTALLED_CASES)
def test_installed_release_mode_is_refused_before_the_first_step(fields, flag):
    """Through the patched schedule function itself: it raises before any forward_step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = torch.nn.Module()
    model.config = _real_config(**fields)
    steps = []
    megatron_core.install(OffloadConfig(policy="full"))
    try:
        schedule = get_forward_backward_func(pp_size=1, vp_size=None)
        with pytest.raises(ValueError, match=flag):
            schedule(forward_step_func=lambda *a: steps.append(a), data_iterator=iter([]),
                     model=[model], num_microbatches=1, seq_length=8, micro_batch_size=1,
                     forward_only=False)
    finally:
        megatron_core.uninstall()
    assert steps == []


# --------------------------------------------------------------- multi-module pipelines (0.17+)
def test_multimodule_pipeline_arguments_are_refused():
    facts = INSTALLED
    config = _real_config()
    cases = [{"p2p_communicator": types.SimpleNamespace(config=config)}]  # no pp_group
    if facts.multimodule_pipelines:
        from megatron.core.pipeline_parallel.multimodule_communicator import (
            MultiModulePipelineCommunicator,
        )
        from megatron.core.process_groups_config import MultiModuleProcessGroupCollection

        cases += [
            {"pg_collection": object.__new__(MultiModuleProcessGroupCollection)},
            {"p2p_communicator": object.__new__(MultiModulePipelineCommunicator)},
        ]
    for kwargs in cases:
        with pytest.raises(ValueError, match="multi-module pipeline") as info:
            megatron_core.refuse_unsupported(config, facts, schedule_kwargs=kwargs)
        assert "without --pipeline-offload" in str(info.value)
    # an ordinary single-module communicator is fine
    ordinary = types.SimpleNamespace(pp_group=object(), config=config)
    megatron_core.refuse_unsupported(config, facts, schedule_kwargs={"p2p_communicator": ordinary})


# ----------------------------------------------------------------- binding by name
def test_backward_step_is_called_by_name_on_every_release():
    """``model_type`` is passed where the release takes it (0.16) and dropped where it does
    not (0.17+); an argument no release knows is an error, never a positional shift."""
    from megatron.core.pipeline_parallel import schedules

    seen = {}

    def backward_step(input_tensor, output_tensor, output_tensor_grad, config):
        seen.update(input_tensor=input_tensor, output_tensor=output_tensor,
                    output_tensor_grad=output_tensor_grad, config=config)
        return "ok"

    assert releases.call_by_name(
        backward_step, input_tensor=1, output_tensor=2, output_tensor_grad=3, model_type="m",
        config=4) == "ok"
    assert seen == dict(input_tensor=1, output_tensor=2, output_tensor_grad=3, config=4)
    with pytest.raises(TypeError, match="takes no argument 'surprise'"):
        releases.call_by_name(backward_step, input_tensor=1, output_tensor=2,
                                   output_tensor_grad=3, config=4, surprise=5)
    takes = "model_type" in inspect.signature(schedules.backward_step).parameters
    assert takes == INSTALLED.backward_step_takes_model_type
