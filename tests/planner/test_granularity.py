"""The planner scores offload granularity: unit (whole chunk-microbatch units) or layer
(each transformer layer's activations streamed on their own), with the layer simulator."""
from __future__ import annotations

import json

import pytest

from megatron_offload import cli
from megatron_offload.planning.costmodel import GiB, unit_bytes, unit_times
from megatron_offload.planning.granularity import LayerSearch as _Search
from megatron_offload.planning.granularity import score_layer_granularity
from megatron_offload.planning.hardware import Hardware
from megatron_offload.planning.job import JobSpec, Recompute
from megatron_offload.planning.search import plan_job

JOB = JobSpec(num_layers=16, hidden_size=2048, num_attention_heads=16, seq_length=4096,
              dtype="bf16", micro_batch_size=1, global_batch_size=16,
              pipeline_model_parallel_size=4, virtual_stages=2, hidden_dropout=0.0,
              attention_dropout=0.0, vocab_size=32000)
"""p = 4, v = 2, m = 16, 2 layers per unit (as in test_planner.py)."""

LAST_STAGE_JOB = JobSpec(num_layers=8, hidden_size=2048, num_attention_heads=16, seq_length=8192,
                         dtype="bf16", micro_batch_size=1, global_batch_size=8,
                         pipeline_model_parallel_size=2, hidden_dropout=0.0, attention_dropout=0.0,
                         vocab_size=32000)
"""1F1B on 2 stages: the last stage's units have no lifespan (each backward follows its forward),
so whole-unit offload cannot lower that rank; layer streaming can (all layers but the last)."""

MEGATRON_ONLY = dict(families=("megatron",), allow_recompute=False)


def hardware_for(k: float, job: JobSpec = JOB, tflops: float = 200.0) -> Hardware:
    """User-given hardware whose host link makes the job's unit-level k exactly ``k``."""
    moved = unit_bytes(job, -1, -1).offloadable
    forward, backward = unit_times(job, tflops)
    link = 2 * moved / (k * (forward + backward)) / 1e9
    return Hardware(name=f"k={k}", gpu_memory_gib=80.0, achieved_tflops=tflops, host_link_gbps=link,
                    host_memory_gib=1024.0)


def _worst_gib(values) -> float:
    return max(values) / GiB


def _as_given_gib(job: JobSpec, hardware: Hardware) -> float:
    return _worst_gib(plan_job(job, hardware, **MEGATRON_ONLY).baseline.memory_bytes)


# ---- choosing layer ------------------------------------------------------------------------------

def test_fast_link_with_offload_chooses_layer_and_lowers_every_rank():
    hardware = hardware_for(0.5)
    budget = 0.9 * _as_given_gib(JOB, hardware)
    plan = plan_job(JOB, hardware, memory_budget_gib=budget, **MEGATRON_ONLY)
    assert plan.fits and plan.offload_chunks >= 1
    assert plan.granularity == "layer", plan.granularity_reason
    unit, layer = plan.chosen, plan.layer
    # Prediction consistency on a fast link: streaming layers never holds more than whole units.
    assert all(lay <= uni * (1 + 1e-9)
               for lay, uni in zip(layer.activation_bytes, unit.activation_bytes))
    assert _worst_gib(layer.memory_bytes) < _worst_gib(unit.memory_bytes)
    # The headline predictions are the chosen granularity's.
    assert (plan.activation_bytes == layer.activation_bytes
            and plan.memory_bytes == layer.memory_bytes)
    assert max(plan.memory_bytes) <= plan.budget_bytes
    assert layer.slowdown <= 0.01 and plan.iteration_time_s <= unit.makespan * 1.01
    assert plan.offload_chunks == layer.chunks == unit.offload_chunks
    assert "granularity layer: lowers the worst rank's memory" in " ".join(plan.reasons)


def test_layer_streaming_may_need_fewer_chunks_than_unit_offload():
    hardware = hardware_for(0.5)
    budget = 0.75 * _as_given_gib(JOB, hardware)
    unit_only = plan_job(JOB, hardware, memory_budget_gib=budget, granularities=("unit",),
                         **MEGATRON_ONLY)
    assert unit_only.fits and unit_only.offload_chunks == 2
    plan = plan_job(JOB, hardware, memory_budget_gib=budget, **MEGATRON_ONLY)
    assert (plan.fits and plan.granularity == "layer"
            and plan.offload_chunks == plan.layer.chunks == 1)
    assert (plan.offload_policy() == ("chunks", 1)
            and max(plan.memory_bytes) < max(unit_only.memory_bytes))
    assert ("streaming fewer chunks (K = 1) than the unit plan offloads (K = 2)"
            in plan.granularity_reason)


def test_last_stage_fits_only_with_layer_streaming():
    hardware = Hardware(name="fast", gpu_memory_gib=80.0, achieved_tflops=200.0,
                        host_link_gbps=100.0, host_memory_gib=1024.0)
    unit_only = plan_job(LAST_STAGE_JOB, hardware, memory_budget_gib=8.0, granularities=("unit",),
                         remedies=False, **MEGATRON_ONLY)
    assert not unit_only.fits
    # The last rank cannot shed a whole unit: its floor is the job as given.
    assert unit_only.floor_bytes[1] == pytest.approx(unit_only.baseline.memory_bytes[1])
    assert unit_only.floor_bytes[1] > 8.0 * GiB
    plan = plan_job(LAST_STAGE_JOB, hardware, memory_budget_gib=8.0, **MEGATRON_ONLY)
    assert (plan.fits and plan.granularity == "layer" and plan.remedy is None
            and plan.missing_bytes == 0)
    assert plan.offload_policy() == ("full", None)
    assert max(plan.memory_bytes) <= plan.budget_bytes < min(plan.chosen.memory_bytes[1],
                                                             unit_only.floor_bytes[1])
    assert (plan.layer.streamed_units[1] == LAST_STAGE_JOB.microbatches
            and plan.layer.offloaded_units[1] == 0)
    # rank 0's units all have a lifespan
    assert plan.layer.offloaded_units == [LAST_STAGE_JOB.microbatches, 0]
    assert "fits only with layer streaming" in plan.granularity_reason


def test_layer_streaming_replaces_the_recompute_fallback():
    """k = 2, a budget whole-unit offload meets only with recomputation (as in
    test_planner.test_recompute_fallback_when_offload_cannot_reach_the_budget): streaming the
    layers fits without recomputation, so the plan is faster."""
    hardware = hardware_for(2.0)
    tiny = plan_job(JOB, hardware, memory_budget_gib=0.5, remedies=False, granularities=("unit",),
                    **MEGATRON_ONLY)
    at_floor = plan_job(JOB, hardware, memory_budget_gib=max(tiny.floor_bytes) / GiB,
                        remedies=False, granularities=("unit",), **MEGATRON_ONLY)
    budget = max(tiny.floor_bytes) / GiB + at_floor.missing_bytes / GiB - 0.3
    unit_only = plan_job(JOB, hardware, memory_budget_gib=budget, families=("megatron",),
                         granularities=("unit",))
    assert unit_only.fits and unit_only.recompute.granularity != "none" and unit_only.slowdown > 0
    plan = plan_job(JOB, hardware, memory_budget_gib=budget, families=("megatron",))
    assert plan.fits and plan.granularity == "layer" and plan.recompute == JOB.recompute
    assert (plan.iteration_time_s < unit_only.iteration_time_s
            and max(plan.memory_bytes) <= plan.budget_bytes)
    assert ("fits only with layer streaming" in plan.granularity_reason
            and "faster than the" in plan.granularity_reason)


# ---- keeping unit --------------------------------------------------------------------------------

def test_slow_link_keeps_unit():
    """k = 4: whole-unit offload hides the longest-lived units; streaming every unit of those
    chunks layer by layer saturates the copy lane and frees less: unit granularity stays."""
    hardware = hardware_for(4.0)
    unit_only = plan_job(JOB, hardware, memory_budget_gib=0.99 * _as_given_gib(JOB, hardware),
                         granularities=("unit",), **MEGATRON_ONLY)
    assert unit_only.fits and unit_only.offload_chunks >= 1
    budget = (_worst_gib(unit_only.chosen.memory_bytes) + 0.02)
    plan = plan_job(JOB, hardware, memory_budget_gib=budget, **MEGATRON_ONLY)
    assert plan.fits and plan.granularity == "unit"
    assert plan.layer is not None  # scored, not chosen
    assert _worst_gib(plan.layer.memory_bytes) >= _worst_gib(plan.chosen.memory_bytes) - 1 / 1024
    assert plan.granularity_reason.startswith("unit: layer streaming")
    assert plan.memory_bytes == plan.chosen.memory_bytes


def test_slow_link_layer_fits_but_is_no_better_keeps_unit():
    """A budget both granularities meet: layer streaming is scored, fits, but holds more on the
    worst rank than whole-unit offload of the longest-lived units."""
    hardware = hardware_for(4.0)
    plan = plan_job(JOB, hardware, memory_budget_gib=_as_given_gib(JOB, hardware) - 0.1,
                    **MEGATRON_ONLY)
    assert plan.fits and plan.offload_chunks >= 1 and plan.granularity == "unit"
    assert plan.layer is not None and plan.layer.fits
    assert _worst_gib(plan.layer.memory_bytes) > _worst_gib(plan.chosen.memory_bytes)
    assert "does not lower the worst rank's memory" in plan.granularity_reason


def test_no_offload_keeps_unit_and_both_peaks_are_equal():
    plan = plan_job(JOB, hardware_for(0.5), **MEGATRON_ONLY)
    assert plan.fits and plan.offload_chunks == 0 and plan.granularity == "unit"
    assert plan.layer_scores == 0  # nothing to score: the fastest plan moves nothing
    peaks = plan.granularity_peaks()
    assert peaks["layer"] == peaks["unit"] == plan.activation_bytes


def test_a_layer_plan_over_the_slowdown_tolerance_is_not_chosen():
    hardware = hardware_for(0.5)
    budget = 0.9 * _as_given_gib(JOB, hardware)
    plan = plan_job(JOB, hardware, memory_budget_gib=budget, layer_slowdown_tolerance=-1.0,
                    **MEGATRON_ONLY)
    assert (plan.fits and plan.granularity == "unit"
            and "slow the iteration" in plan.granularity_reason)


def test_full_recompute_keeps_unit():
    job = JOB.with_changes(recompute=Recompute(granularity="full", method="uniform", num_layers=1))
    hardware = hardware_for(0.5, job)
    budget = _as_given_gib(job, hardware) - 0.05  # the last rank offloads a little
    plan = plan_job(job, hardware, memory_budget_gib=budget, **MEGATRON_ONLY)
    assert plan.fits and plan.offload_chunks >= 1 and plan.granularity == "unit"
    assert "full recomputation" in plan.granularity_reason
    assert plan.granularity_peaks()["layer"] == plan.granularity_peaks()["unit"]


# ---- the layer model agrees with the unit model --------------------------------------------------

@pytest.mark.parametrize("job", [
    JOB, LAST_STAGE_JOB,
    JOB.with_changes(recompute=Recompute(granularity="selective",
                                         modules=("core_attn", "layernorm"))),
], ids=["interleaved", "1f1b", "selective"])
def test_without_streaming_the_layer_peak_is_the_unit_peak(job):
    """Nothing streams: the layer simulator, fed the cost model's per-layer bytes and the rest
    of each unit, must reproduce the unit sweep's peak on every rank (same bytes, same times)."""
    plan = plan_job(job, hardware_for(0.5, job), **MEGATRON_ONLY)
    score = score_layer_granularity(plan, 0)
    assert score.copies == [0] * job.pp and score.slowdown == pytest.approx(0.0, abs=1e-9)
    assert score.activation_bytes == pytest.approx(plan.chosen.activation_bytes, rel=1e-9)
    assert score.makespan == pytest.approx(plan.chosen.makespan, rel=1e-9)


@pytest.mark.parametrize("k", [0.25, 1.0])
@pytest.mark.parametrize("job, shape, chunks", [
    (JOB, ("interleaved", 4), 1), (JOB, ("interleaved", 4), 2), (JOB, ("gis", 4), 1),
    (JOB, ("gis", 2), 2), (LAST_STAGE_JOB, ("1f1b", None), 1),
], ids=["interleaved-K1", "interleaved-K2", "gis4-K1", "gis2-K2", "1f1b"])
def test_on_a_fast_link_streaming_layers_never_holds_more(job, shape, chunks, k):
    """k <= 1: per rank, the layer peak with the units of chunks < K streaming is at most the
    unit peak with every unit of chunks < K a candidate for whole-unit offload (1F1B's last
    rank, whose units cannot leave, still gains: its layers stream)."""
    search = _Search(job, hardware_for(k, job), float("inf"), float("inf"), 64 * 1024, None,
                     layer_scores=1)
    setting = search.setting(job.recompute, 0)
    unit = search.unit_at(*shape, setting, chunks)
    layer = search.layer_score(*shape, setting, chunks)
    assert all(lay <= uni * (1 + 1e-9)
               for lay, uni in zip(layer.activation_bytes, unit.activation_bytes))
    if shape[0] == "1f1b":
        assert layer.activation_bytes[-1] < unit.activation_bytes[-1]
    assert layer.slowdown == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("k", [0.5, 1.5])
@pytest.mark.parametrize("shape, chunks", [(("interleaved", 4), 1), (("interleaved", 4), 2),
                                           (("gis", 4), 1), (("gis", 2), 1), (("gis", 3), 2)])
def test_the_short_schedule_predicts_the_full_one(shape, chunks, k):
    """Layer scores simulate fewer microbatches (rank 0's warm-up and a round of steady state,
    checked against the job's peaks without offload and with the streamed chunks away); the
    job's own 32 microbatches give the same peaks and slowdown."""
    job = JOB.with_changes(global_batch_size=32)
    hardware = hardware_for(k, job)
    plan = plan_job(job, hardware, **MEGATRON_ONLY)
    short = score_layer_granularity(plan, chunks, shape=shape)
    full = score_layer_granularity(plan, chunks, shape=shape, full_schedule=True)
    assert short.simulated_microbatches <= full.simulated_microbatches == job.microbatches
    if shape[0] == "interleaved":
        # 3 groups of 4: the warm-up (11 forwards on rank 0) and 8 more
        assert short.simulated_microbatches == 12
    assert short.activation_bytes == pytest.approx(full.activation_bytes, rel=0.01)
    assert short.slowdown == pytest.approx(full.slowdown, abs=0.005)


# ---- what the CLI says ---------------------------------------------------------------------------

SMALL = ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "16",
         "--seq-length", "4096", "--bf16", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--vocab-size", "32000", "--micro-batch-size", "1", "--global-batch-size", "16",
         "--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage", "2",
         "--offload-schedule", "megatron", "--no-recompute-fallback"]


def _hw_flags(k: float) -> list[str]:
    hardware = hardware_for(k)
    return ["--gpu-memory-gib", "80", "--gpu-tflops", "200",
            "--host-link-gbps", repr(hardware.host_link_gbps), "--host-memory-gib", "1024"]


def test_json_reports_both_granularities(capsys):
    budget = 0.9 * _as_given_gib(JOB, hardware_for(0.5))
    code = cli.main(["plan", *SMALL, *_hw_flags(0.5), "--memory-budget-gib", f"{budget:.3f}",
                     "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fits"] and report["granularity"] == "layer"
    unit, layer = (report["predicted_peak_activation_gib_unit"],
                   report["predicted_peak_activation_gib_layer"])
    assert len(unit) == len(layer) == 4 and all(lay <= uni for lay, uni in zip(layer, unit))
    assert report["predicted_peak_activation_gib"] == layer
    assert report["predicted_peak_memory_gib"] == report["predicted_peak_memory_gib_layer"]
    assert report["layer_streaming"]["chunks"] == report["offload_chunks"] >= 1
    code = cli.main(["plan", *SMALL, *_hw_flags(0.5), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["granularity"] == "unit" and report["layer_streaming"] is None
    assert (report["predicted_peak_activation_gib_layer"]
            == report["predicted_peak_activation_gib_unit"]
            == report["predicted_peak_activation_gib"])


def test_text_names_the_granularity_and_recommends_the_flag(capsys):
    budget = 0.9 * _as_given_gib(JOB, hardware_for(0.5))
    code = cli.main(["plan", *SMALL, *_hw_flags(0.5), "--memory-budget-gib", f"{budget:.3f}"])
    text = capsys.readouterr().out
    assert code == 0
    plan_line = next(line for line in text.splitlines() if line.startswith("PLAN:"))
    assert "granularity layer" in plan_line and "--offload-granularity layer" in plan_line
    assert ("granularity layer (--offload-granularity layer): peak activations on the worst rank"
            in text)
    assert " at unit, " in text and " at layer granularity" in text
    rows = [line for line in text.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert len(rows) == 4 and all("*" in row for row in rows)
