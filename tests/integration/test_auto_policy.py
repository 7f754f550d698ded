"""``--offload-policy auto`` on megatron-core's real model, and the cost model it plans with.

1. The cost model against measurement: tiny GPTs through megatron-core's own modules and
   schedules on four gloo ranks, policy auto with a budget no rank can reach (it offloads
   nothing but records the cost model's bytes per unit, from the JobSpec it built from the live
   model), ``measure_memory`` on: the predicted bytes of every unit are within 5% of what the
   runtime measured for that unit (its saved storages plus its received input), on every rank,
   first and last stage included; and the predicted resident peak (no offload) is never below
   the measured one.
2. Acceptance: with a budget between the measured no-offload and full-offload peaks, the
   measured per-rank peak (``peak_saved_bytes``: what the budget counts) stays within the
   budget on every rank and in every iteration, and losses and gradients are bitwise those of
   unpatched Megatron; a budget above the no-offload peak offloads nothing; a budget below the
   full-offload floor fails on every rank before the first step, naming the flag.
"""
from __future__ import annotations

import pytest

from megatron_offload.config import OffloadConfig
from megatron_offload.schedule.ir import Op
from megatron_offload.schedule.layers import runtime_rank_ops
from megatron_offload.testing.gpt import TinyGPTCase
from megatron_offload.testing.pool import WorkerError, session_pool
from megatron_offload.testing.reference import compare_runs, compare_runs_per_rank

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN_CASE = "megatron_offload.testing.reference:run_case"
GIB = 2**30
LLAMA = dict(position_embedding_type="rope", swiglu=True, num_query_groups=2,
             normalization="RMSNorm", add_bias_linear=False)
ADAM = dict(optimizer="adam", lr=1e-3)


def _pool(pool4):
    return pool4 if pool4.alive() else session_pool(4)


def _auto(budget_gib: float, granularity: str = "unit", **kw) -> OffloadConfig:
    """Unit granularity unless asked: the planner's residency model is the unit one (layer
    streaming only lowers what it predicts)."""
    return OffloadConfig(policy="auto", memory_budget_gib=budget_gib, measure_memory=True,
                         min_offload_bytes=0, granularity=granularity, **kw)


# hidden / heads / groups, seq, micro batch, SwiGLU, recompute, VPP, bf16, tied: every row has a
# first and a last stage (with PP = 1 one unit is both); chunks and ranks differ in what they keep.
COST_CASES = [
    pytest.param(dict(pp=4, num_layers=4, microbatches=4), id="gpt-pp4"),
    pytest.param(dict(pp=1, num_layers=2, microbatches=2), id="gpt-pp1-dp4"),
    pytest.param(dict(pp=2, vpp=2, num_layers=4, microbatches=4, **LLAMA), id="llama-pp2vpp2"),
    pytest.param(dict(pp=4, vpp=2, num_layers=8, microbatches=8, bf16=True, **ADAM),
                 id="gpt-pp4vpp2-bf16"),
    pytest.param(dict(pp=2, num_layers=4, microbatches=4, hidden_size=96, num_attention_heads=6,
                      seq_length=48, micro_batch_size=1, recompute="selective"),
                 id="gpt-h96-a6-s48-b1-coreattn"),
    pytest.param(dict(pp=4, num_layers=8, microbatches=4, recompute="full"),
                 id="gpt-pp4-full-2layers"),
    pytest.param(dict(pp=2, vpp=2, num_layers=4, microbatches=4, recompute="selective",
                      recompute_modules=("layernorm",), bf16=True, **LLAMA, **ADAM),
                 id="llama-pp2vpp2-bf16-layernorm"),
    pytest.param(dict(pp=4, num_layers=4, microbatches=4, hidden_size=128, num_attention_heads=8,
                      num_query_groups=2, swiglu=True, seq_length=24, micro_batch_size=3),
                 id="gqa-h128-a8-g2-swiglu-s24-b3"),
    pytest.param(dict(pp=2, num_layers=4, microbatches=4, recompute="selective",
                      recompute_modules=("mlp",), **LLAMA),
                 id="llama-pp2-mlp"),
    pytest.param(dict(pp=4, num_layers=4, microbatches=4, tie_embeddings=True), id="gpt-pp4-tied"),
    pytest.param(dict(pp=2, vpp=2, num_layers=4, microbatches=4, bf16=True, **LLAMA, **ADAM),
                 id="llama-pp2vpp2-bf16"),
    pytest.param(dict(pp=4, num_layers=4, microbatches=4, bf16=True, recompute="full", **LLAMA,
                      **ADAM),
                 id="llama-pp4-bf16-full"),
    pytest.param(dict(pp=2, num_layers=2, microbatches=3, bf16=True, micro_batch_size=3,
                      seq_length=40, recompute="selective", **LLAMA, **ADAM),
                 id="llama-pp2-bf16-coreattn-s40-b3"),
]
TOLERANCE = 0.05


def _plan(rank: dict) -> dict:
    (plan,) = rank["offload_plan"]  # one schedule shape
    return plan


@pytest.mark.parametrize("kwargs", COST_CASES)
def test_cost_model_matches_measured_unit_bytes(pool4, kwargs, capsys):
    case = TinyGPTCase(**kwargs)
    ranks = _pool(pool4).run(RUN_CASE, case=case, iterations=1, offload_config=_auto(1e6))
    rows, errors = [], []
    for rank in sorted(ranks, key=lambda r: r["rank"]):
        plan, stats = _plan(rank), rank["offload_stats"][0]
        pp = rank["pp_rank"]
        assert stats["offloaded_bytes"] == 0 and plan["offload"] == []
        predicted = plan["unit_bytes"][pp]
        assert len(plan["unit_bytes"]) == case.pp and len(predicted) == case.num_chunks
        measured: dict[int, set] = {}
        for key, nbytes in stats["unit_bytes"].items():
            measured.setdefault(int(key.split(",")[0]), set()).add(nbytes)
        assert sorted(measured) == list(range(case.num_chunks))
        for chunk, values in sorted(measured.items()):
            for value in values:
                error = predicted[chunk] / value - 1
                if abs(error) > TOLERANCE:
                    errors.append(f"rank {pp} chunk {chunk}: predicted {predicted[chunk]} "
                                  f"measured {value} ({error:+.2%})")
            if rank["dp_rank"] == 0:
                rows.append(f"  pp rank {pp} chunk {chunk}: measured {sorted(values)} "
                            f"predicted {predicted[chunk]} "
                            f"({predicted[chunk] / max(values) - 1:+.3%})")
        # The budget is safe: the predicted peak without offload is not below the measured one.
        mine = next(c for c in plan["ranks"] if c["rank"] == pp)
        if mine["peak_without_bytes"] < stats["peak_saved_bytes"]:
            errors.append(f"rank {pp}: predicted peak {mine['peak_without_bytes']:.0f} below the "
                          f"measured {stats['peak_saved_bytes']}")
        if rank["dp_rank"] == 0:
            rows.append(f"  pp rank {pp} peak without offload: measured "
                        f"{stats['peak_saved_bytes']} predicted "
                        f"{mine['peak_without_bytes']:.0f}")
    with capsys.disabled():
        print(f"\n{case.label()}:\n" + "\n".join(rows))
    assert not errors, "\n".join(errors)


def _peaks(ranks: list[dict]) -> dict[int, int]:
    """pp rank -> the largest peak_saved_bytes of any iteration on any of its dp replicas."""
    out: dict[int, int] = {}
    for rank in ranks:
        peak = max(s["peak_saved_bytes"] for s in rank["offload_stats"])
        out[rank["pp_rank"]] = max(out.get(rank["pp_rank"], 0), peak)
    return out


AUTO_CASES = [
    pytest.param(TinyGPTCase(pp=4, vpp=2, microbatches=8), compare_runs, id="gpt-pp4vpp2-m8"),
    pytest.param(TinyGPTCase(pp=4, num_layers=4, microbatches=8, bf16=True,
                             gradient_accumulation_fusion=True, overlap_grad_reduce=True,
                             use_distributed_optimizer=True, **LLAMA, **ADAM),
                 compare_runs_per_rank, id="llama-pp4-1f1b-bf16-distopt"),
]


@pytest.mark.parametrize("case, compare", AUTO_CASES)
def test_auto_meets_a_budget_between_no_offload_and_full_offload(pool4, case, compare, capsys):
    pool = _pool(pool4)
    iterations = 2
    reference = pool.run(RUN_CASE, case=case, iterations=iterations)
    none = _peaks(pool.run(RUN_CASE, case=case, iterations=iterations,
                           offload_config=OffloadConfig(policy="none", measure_memory=True,
                                                        min_offload_bytes=0, granularity="unit")))
    full = _peaks(pool.run(RUN_CASE, case=case, iterations=iterations,
                           offload_config=OffloadConfig(policy="full", measure_memory=True,
                                                        min_offload_bytes=0, granularity="unit")))
    budget = (max(none.values()) + max(full.values())) / 2
    assert max(full.values()) < budget < max(none.values())

    ranks = pool.run(RUN_CASE, case=case, iterations=iterations, offload_config=_auto(budget / GIB))
    mismatches = compare(reference, ranks)
    assert not mismatches, "\n".join(mismatches[:20])
    measured = _peaks(ranks)
    lines = [f"{case.label()}: budget {budget:.0f} bytes ({budget / 2**20:.3f} MiB) "
             "of resident activations per rank"]
    partial = 0
    for rank in sorted(ranks, key=lambda r: r["rank"]):
        plan, pp = _plan(rank), rank["pp_rank"]
        mine = next(c for c in plan["ranks"] if c["rank"] == pp)
        assert mine["fits"] and mine["peak_bytes"] <= budget
        offload = {tuple(unit) for unit in plan["offload"]}
        for stats in rank["offload_stats"]:
            # every iteration within the budget; the runtime issued exactly the IR's ops for
            # this set
            assert stats["peak_saved_bytes"] <= budget, (
                pp, stats["iteration"], stats["peak_saved_bytes"], budget
            )
            order = [Op.parse(t) for t in stats["rank_order"].split()]
            assert stats["executed_ops"] == [str(op) for op in runtime_rank_ops(order, offload, 1)]
            assert stats["offloaded_units"] == len(offload)
        partial += 0 < len(offload) < mine["candidates"]
        if rank["dp_rank"] == 0:
            lines.append(f"  pp rank {pp}: measured peak {measured[pp]} "
                         f"(none {none[pp]}, full {full[pp]}), predicted "
                         f"{mine['peak_bytes']:.0f}; offloads {len(offload)} of {mine['units']} "
                         f"units {mine['per_chunk']}")
    assert partial, "the budget should make some rank offload part of its units"
    assert any(line.startswith("> megatron-offload auto plan: rank 0 offloads")
               for line in _plan(ranks[0])["log"])
    with capsys.disabled():
        print("\n" + "\n".join(lines))

    # The same budget with layer streaming: the same units leave, their layers stream; still
    # within the budget and bitwise.
    layered = pool.run(RUN_CASE, case=case, iterations=iterations,
                       offload_config=_auto(budget / GIB, "layer"))
    assert not compare(reference, layered)
    for rank in layered:
        offload = {tuple(unit) for unit in _plan(rank)["offload"]}
        for stats in rank["offload_stats"]:
            assert stats["peak_saved_bytes"] <= budget
            assert stats["offloaded_units"] == len(offload)

    # A budget above the no-offload peak: nothing moves.
    generous = pool.run(RUN_CASE, case=case, iterations=1,
                        offload_config=_auto(2 * max(none.values()) / GIB))
    for rank in generous:
        assert _plan(rank)["offload"] == [] and rank["offload_stats"][0]["offloaded_bytes"] == 0

    # Below the full-offload floor: every rank refuses before its first step, naming the flag.
    with pytest.raises(WorkerError) as info:
        pool.run(RUN_CASE, case=case, iterations=1,
                 offload_config=_auto(min(full.values()) / 4 / GIB))
    error = info.value
    assert sorted(error.errors) == [0, 1, 2, 3], error.errors  # all ranks: none left waiting
    text = error.remote_traceback
    assert ("AutoPlanError" in text and "--offload-memory-budget-gib" in text
            and "missing" in text and "Remedy" in text)
    assert "run_forward" not in text  # raised before any step reached the runtime
    assert pool.alive()
