"""Policy auto's selection (planning.auto.choose_offload_units), its config, and what the plan CLI
shows.

Pure Python: the runtime's use of the same function on megatron-core is in
tests/integration/test_auto_policy.py.
"""
from __future__ import annotations

import itertools
import json

import pytest

from megatron_offload import cli
from megatron_offload.config import OffloadConfig
from megatron_offload.planning.auto import (
    choose_offload_units,
    plan_auto_offload,
    resident_peak,
)
from megatron_offload.planning.costmodel import GiB, UnitBytes
from megatron_offload.planning.job import JobSpec
from megatron_offload.planning.policy import unit_lifespans, units_to_offload
from megatron_offload.schedule.ir import Op
from megatron_offload.schedule.kinds import OpKind
from megatron_offload.schedule.layers import runtime_rank_ops
from megatron_offload.schedule.megatron import megatron_schedule

EQUAL = [UnitBytes(total=100, offloadable=90)] * 2  # per chunk


def _levels(ops, units):
    """Resident bytes at every sampling point, written out independently of resident_peak."""
    level, out = 0, []
    for op in ops:
        unit = units[op.chunk]
        if op.kind is OpKind.FORWARD:
            level += unit.total
            out.append(level)
        elif op.kind is OpKind.OFFLOAD:
            level -= unit.offloadable
        elif op.kind is OpKind.RELOAD:
            level += unit.offloadable
        else:
            out.append(level)
            level -= unit.total
    return out


def _brute_force_fewest(order, units, budget, prefetch=1):
    """The smallest number of units whose offload meets the budget (None: none does)."""
    candidates = [u for u, life in unit_lifespans(order).items() if life > prefetch]
    for size in range(len(candidates) + 1):
        for subset in itertools.combinations(candidates, size):
            if resident_peak(runtime_rank_ops(order, set(subset), prefetch), units) <= budget:
                return size
    return None


SHAPES = [("1f1b", 4, 1, 6), ("interleaved", 2, 2, 4), ("interleaved", 4, 2, 4)]


@pytest.mark.parametrize("kind, p, v, m", SHAPES)
@pytest.mark.parametrize("prefetch", [1, 2])
def test_fewest_units_equal_bytes(kind, p, v, m, prefetch):
    """With equal unit bytes the sweep offloads as few units as any subset could (brute force
    over every subset of the units that can free memory), on every rank and budget."""
    schedule = megatron_schedule(kind, p, v, m)
    for rank in range(p):
        order = schedule.ranks[rank]
        without = resident_peak(runtime_rank_ops(order, set(), prefetch), EQUAL)
        for budget in range(100, int(without) + 101, 50):
            choice = choose_offload_units(order, EQUAL, budget, prefetch_distance=prefetch)
            fewest = _brute_force_fewest(order, EQUAL, budget, prefetch)
            if fewest is None:
                assert not choice.fits and choice.peak_bytes == choice.floor_bytes > budget
            else:
                assert choice.fits and choice.peak_bytes <= budget
                assert len(choice.offload) == fewest, (rank, budget)


def test_unequal_bytes_still_fit_and_peak_is_the_ir_walk():
    """First / last stage units are bigger: the greedy still meets the budget, and the peak it
    reports is the maximum over the runtime IR's sampling points."""
    schedule = megatron_schedule("interleaved", 4, 2, 8)
    units = [UnitBytes(total=130, offloadable=120), UnitBytes(total=100, offloadable=60)]
    for budget in (1100, 900, 700, 500, 420):
        choice = choose_offload_units(schedule.ranks[0], units, budget)
        ops = runtime_rank_ops(schedule.ranks[0], set(choice.offload), 1)
        assert choice.peak_bytes == max(_levels(ops, units))
        every = units_to_offload(schedule.ranks[0], OffloadConfig(policy="full"))
        assert choice.floor_bytes == max(
            _levels(runtime_rank_ops(schedule.ranks[0], every, 1), units))
        assert choice.peak_without_bytes == max(
            _levels(runtime_rank_ops(schedule.ranks[0], set(), 1), units))
        assert choice.fits == (choice.peak_bytes <= budget)
        assert choice.fits or choice.peak_bytes == choice.floor_bytes


def test_longest_lived_first_in_megatron_interleaved():
    """p=4 v=2 m=8: a budget a few units under rank 0's peak (11 units) is met by chunk 0 units
    only (their backwards come last); chunk 1 only when chunk 0 is not enough. At the first
    point over budget, the unit chosen is the one away there whose backward comes last (the
    longest remaining lifespan)."""
    schedule = megatron_schedule("interleaved", 4, 2, 8)
    order = schedule.ranks[0]
    choice = choose_offload_units(order, EQUAL, 800)
    assert choice.per_chunk() == {0: len(choice.offload)} and 0 < len(choice.offload) < 8
    one = choose_offload_units(order, EQUAL, 1010)  # 90 bytes over at the peak (end of warm-up)
    assert len(one.offload) == 1
    warmup = order[: order.index(next(op for op in order if op.kind is OpKind.BACKWARD))]
    alive = [op.unit for op in warmup[:-1]]  # the unit just computed is resident at its own sample
    last_backward = max(alive, key=lambda unit: order.index(Op(OpKind.BACKWARD, *unit)))
    assert one.offload == {last_backward} and last_backward[0] == 0
    tight = choose_offload_units(order, EQUAL, 400)
    assert tight.per_chunk()[0] == 8 and tight.per_chunk()[1] > 0


def test_generous_budget_offloads_nothing_and_tiny_budget_does_not_fit():
    schedule = megatron_schedule("interleaved", 4, 2, 8)
    for order in schedule.ranks:
        free = choose_offload_units(order, EQUAL, 10_000, overhead_bytes=50)
        assert not free.offload and free.fits and free.peak_bytes == free.peak_without_bytes
        assert free.peak_without_bytes == max(
            _levels(runtime_rank_ops(order, set(), 1), EQUAL)) + 50
        tiny = choose_offload_units(order, EQUAL, 150)
        assert not tiny.fits and tiny.missing_bytes == tiny.floor_bytes - 150 > 0


def test_the_set_is_a_runtime_offload_set():
    """What auto returns is a plain unit set, a subset of policy full's, so the runtime and its
    op-for-op IR check take it as they take policy full's."""
    schedule = megatron_schedule("interleaved", 4, 2, 8)
    for order in schedule.ranks:
        choice = choose_offload_units(order, EQUAL, 500)
        assert choice.offload <= units_to_offload(order, OffloadConfig(policy="full"))
        ops = runtime_rank_ops(order, set(choice.offload), 1)
        assert [op for op in ops if op.kind is OpKind.OFFLOAD] == [
            Op(OpKind.OFFLOAD, *op.unit) for op in order
            if op.kind is OpKind.FORWARD and op.unit in choice.offload]


JOB = JobSpec(num_layers=16, hidden_size=2048, num_attention_heads=16, seq_length=4096,
              dtype="bf16", hidden_dropout=0.0, attention_dropout=0.0, vocab_size=32000,
              micro_batch_size=2, global_batch_size=32, pipeline_model_parallel_size=4,
              virtual_stages=2)


def test_plan_for_every_rank_and_the_error_names_the_flag_and_a_remedy():
    orders = megatron_schedule("interleaved", 4, 2, JOB.microbatches).ranks
    plan = plan_auto_offload(JOB, orders, 100 * GiB)
    assert plan.fits and all(not c.offload for c in plan.ranks)
    lines = plan.log_lines()
    assert len(lines) == 4 and lines[0].startswith(
        "> megatron-offload auto plan: rank 0 offloads 0 of 32 units")
    tight = plan_auto_offload(JOB, orders, 0.2 * GiB)
    assert not tight.fits
    message = tight.does_not_fit_message()
    assert "--offload-memory-budget-gib" in message and "missing" in message
    assert "--micro-batch-size 1" in message and "--recompute-granularity full" in message
    # the least budget it names is enough
    assert plan_auto_offload(JOB, orders, tight.least_budget_bytes).fits
    mid = plan_auto_offload(JOB, orders,
                            (plan.ranks[0].peak_without_bytes + tight.least_budget_bytes) / 2)
    assert mid.fits and 0 < len(mid.ranks[0].offload) < mid.ranks[0].candidates
    assert "(chunk 0: " in mid.log_lines()[0]


@pytest.mark.parametrize("kwargs, flag", [
    ({"policy": "auto"}, "--offload-memory-budget-gib"),
    ({"policy": "auto", "memory_budget_gib": 0}, "--offload-memory-budget-gib"),
    ({"policy": "auto", "memory_budget_gib": -3.0}, "--offload-memory-budget-gib"),
    ({"policy": "auto", "memory_budget_gib": "20"}, "--offload-memory-budget-gib"),
    ({"policy": "auto", "memory_budget_gib": True}, "--offload-memory-budget-gib"),
    ({"policy": "auto", "memory_budget_gib": float("nan")}, "--offload-memory-budget-gib"),
    ({"policy": "full", "memory_budget_gib": 20.0}, "--offload-memory-budget-gib"),
    ({"policy": "auto", "memory_budget_gib": 20.0, "memory_budget_scope": "host"},
     "--offload-memory-budget-scope"),
    ({"policy": "auto", "memory_budget_gib": 20.0, "memory_reserve_gib": -1},
     "--offload-memory-reserve-gib"),
])
def test_auto_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        OffloadConfig(**kwargs)


def test_auto_config_accepts_a_budget_and_has_no_fixed_rule():
    config = OffloadConfig(policy="auto", memory_budget_gib=3.5)
    assert (config.memory_budget_bytes == int(3.5 * GiB)
            and config.memory_budget_scope == "activations")
    with pytest.raises(ValueError, match="planner"):
        units_to_offload(megatron_schedule("1f1b", 2, 1, 2).ranks[0], config)


SMALL = ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "16",
         "--seq-length", "4096", "--bf16", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--vocab-size", "32000", "--micro-batch-size", "2", "--global-batch-size", "32",
         "--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage", "2"]
HW = ["--gpu-memory-gib", "80", "--gpu-tflops", "200", "--host-link-gbps", "30",
      "--host-memory-gib", "1024"]


def test_plan_cli_shows_what_policy_auto_chooses(capsys):
    """``plan --offload-memory-budget-gib X`` runs the runtime's selection for the job as given."""
    budget = 5.0  # between full offload's 3.1 GiB and no offload's 11.1 GiB on rank 0
    code = cli.main(["plan", *SMALL, *HW, "--offload-memory-budget-gib", str(budget), "--json"])
    report = json.loads(capsys.readouterr().out)
    auto = report["auto"]
    orders = megatron_schedule("interleaved", 4, 2, 16).ranks
    from megatron_offload.planning.costmodel import overhead_bytes

    direct = plan_auto_offload(JOB, orders, budget * GiB,
                               overhead_bytes=[overhead_bytes(JOB, r) for r in range(4)])
    assert auto["offloaded_units_per_rank"] == [len(c.offload) for c in direct.ranks]
    assert auto["predicted_peak_activation_gib"] == [round(c.peak_bytes / GiB, 4)
                                                     for c in direct.ranks]
    assert auto["fits"] and code == 0 and 0 < auto["offloaded_units_per_rank"][0] < 32
    assert all(p <= budget for p in auto["predicted_peak_activation_gib"])
    cli.main(["plan", *SMALL, *HW, "--offload-memory-budget-gib", str(budget)])
    text = capsys.readouterr().out
    assert "policy auto (--offload-memory-budget-gib 5" in text and "rank 0 offloads" in text


def test_plan_cli_auto_refusal_exits_1(capsys):
    code = cli.main(["plan", *SMALL, *HW, "--offload-memory-budget-gib", "0.1"])
    text = capsys.readouterr().out
    assert (code == 1 and "policy auto would refuse to start" in text
            and "--offload-memory-budget-gib" in text)
