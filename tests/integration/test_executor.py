"""The executor (``--offload-schedule gis``) against unpatched Megatron, and its memory.

Every case builds one tiny GPT per rank and trains it three iterations (plain SGD step on
``main_grad`` after each) several times from the same weights and data: first through
Megatron's own, unpatched schedule function (the reference), then through the executor with
generalized interleaving for each group size and offload policy. Losses, every gradient and
the weights after the last step must be bitwise identical: Megatron's schedules and GIS run
each chunk's backwards in microbatch order (per-chunk FIFO), so every ``main_grad`` is summed
in the same order whatever the group size, and each microbatch's loss is its own computation.

Memory: the runtime measures resident bytes at every step boundary (weak references to the
storages the units keep); ``executor_cases.measured_units`` checks that those bytes are, at
every sample, exactly the bytes of the units the executed ops hold, and the peak of that count
must equal the simulator's ``peak_units`` for the same schedule IR on every rank, with copies
modelled as the CPU backend makes them (synchronous: k = 0).
"""
from __future__ import annotations

import math
import os
import tempfile

import pytest

from megatron_offload.config import OffloadConfig
from megatron_offload.integration.gis_schedule import costs_for, planned_schedule
from megatron_offload.schedule.simulate import simulate
from megatron_offload.testing.executor_cases import measured_units
from megatron_offload.testing.gpt import TinyGPTCase
from megatron_offload.testing.pool import WorkerPool, session_pool

RUN_VARIANTS = "megatron_offload.testing.executor_cases:run_variants"
RUN_CASE = "megatron_offload.testing.reference:run_case"
POLICIES = {
    "none": dict(policy="none"),
    "chunks1": dict(policy="chunks", offload_chunks=1),
    "full": dict(policy="full"),
}


def _pool(world: int, pool4):
    """The session's pool of ``world`` ranks (p = 3 needs three; started on first use)."""
    if world == 4 and pool4.alive():
        return pool4
    return session_pool(world)


def gis(policy: str, group: int, granularity: str = "unit", **extra) -> OffloadConfig:
    """Unit granularity by default: the unit-level simulator predicts what it measures."""
    return OffloadConfig(schedule="gis", group_size=group, measure_memory=True, min_offload_bytes=0,
                         granularity=granularity, **POLICIES[policy], **extra)


def matrix_case(pp: int, vpp: int, m: int, **extra) -> TinyGPTCase:
    # Megatron's interleaved schedule needs pp <= g and m % g in {0} or >= pp: one group of m
    # when m = 2p + 1 (the reference only; GIS takes any g).
    group = None if vpp == 1 or m % pp == 0 else m
    return TinyGPTCase(pp=pp, vpp=None if vpp == 1 else vpp, microbatches=m, num_layers=pp * vpp,
                       microbatch_group_size=group, **extra)


def variants_for(pp: int, vpp: int) -> list[tuple[str, dict]]:
    out = [("reference", {"offload": None}),
           ("executor-megatron-order", {"offload": OffloadConfig(schedule="gis", policy="none",
                                                                 granularity="unit"),
                                        "order": "megatron"})]
    for group in sorted({1, math.ceil(pp / 2), pp}):
        for policy in POLICIES:
            if vpp == 1 and policy == "chunks1":
                continue  # one chunk: chunks K=1 is full
            out.append((f"gis-g{group}-{policy}", {"offload": gis(policy, group), "group": group,
                                                   "policy": policy}))
    return out


def check_matrix(pool, pp: int, vpp: int, m: int) -> list[str]:
    return check_matrix_variants(pool, pp, vpp, m, variants_for(pp, vpp)[1:])


def check_matrix_variants(pool, pp: int, vpp: int, m: int, variants: list) -> list[str]:
    """Run the reference and ``variants`` [(name, variant)]; every problem found."""
    case = matrix_case(pp, vpp, m)
    named = [("reference", {"offload": None}), *variants]
    ranks = pool.run(RUN_VARIANTS, case=case, variants=[v for _, v in named], iterations=3,
                     timeout=300)
    problems = []
    world = len(ranks)
    for index, (name, variant) in enumerate(named[1:], start=1):
        for rank in ranks[: pp]:  # data-parallel rank 0 of each stage (dp ranks hold the same)
            result = rank[index]
            problems += [f"{name}: {x}" for x in result["mismatches"][:3]]
            if "group" not in variant:
                continue  # the executor on Megatron's order: bitwise only
            config = variant["offload"]
            schedule = planned_schedule(pp, vpp, m, min(variant["group"], m), config.policy,
                                        config.offload_chunks, "cpu")[0]
            predicted = simulate(schedule, costs_for("cpu")).peak_units[result["pp_rank"]]
            try:
                counts = measured_units(result["stats"])
            except AssertionError as error:
                problems.append(f"{name} pp rank {result['pp_rank']}: {error}")
                continue
            if max(counts) != predicted:
                problems.append(f"{name} pp rank {result['pp_rank']}: "
                                f"measured peak {max(counts)} units, simulator {predicted}")
            ops = [str(op) for op in schedule.ranks[result["pp_rank"]]]
            if result["stats"]["executed_ops"] != ops:
                problems.append(
                    f"{name} pp rank {result['pp_rank']}: executed ops differ from the IR"
                )
    assert world % pp == 0
    return problems


FAST = [(2, 2, 2), (4, 2, 9)]
SWEEP = [(p, v, m) for p in (2, 3, 4) for v in (1, 2, 3) for m in (p, 2 * p + 1)
         if (p, v, m) not in FAST]
SWEEP += [(2, 4, 5), (4, 4, 4)]  # v = 4


@pytest.mark.parametrize("pp, vpp, m", FAST, ids=[f"p{p}v{v}m{m}" for p, v, m in FAST])
def test_gis_bitwise_and_peaks(pool4, pp, vpp, m):
    problems = check_matrix(_pool(3 if pp == 3 else 4, pool4), pp, vpp, m)
    assert not problems, "\n".join(problems[:30])


@pytest.mark.slow
@pytest.mark.parametrize("pp, vpp, m", SWEEP, ids=[f"p{p}v{v}m{m}" for p, v, m in SWEEP])
def test_gis_bitwise_and_peaks_sweep(pool4, pp, vpp, m):
    problems = check_matrix(_pool(3 if pp == 3 else 4, pool4), pp, vpp, m)
    assert not problems, "\n".join(problems[:30])


def _run(pool, case, variants, iterations=3):
    return pool.run(RUN_VARIANTS, case=case, variants=variants, iterations=iterations, timeout=300)


def _mismatches(ranks) -> list[str]:
    return [x for rank in ranks for result in rank[1:] for x in result["mismatches"]]


def test_full_offload_gis_p4_v2_keeps_at_most_4_units(pool4):
    """Acceptance: gis g = ceil(p/2), p=4, v=2, full offload: every rank <= 4 units measured,
    against 11 on rank 0 under Megatron's interleaved schedule without offload."""
    case = matrix_case(4, 2, 8)
    none = OffloadConfig(policy="none", measure_memory=True, min_offload_bytes=0,
                         granularity="unit")
    ranks = _run(pool4, case,
                 [{"offload": None}, {"offload": none}, {"offload": gis("full", 2)}], 2)
    assert not _mismatches(ranks)
    megatron, offloaded = [], []
    for rank in sorted(ranks, key=lambda r: r[0]["pp_rank"]):
        # Megatron's schedule keeps its last inputs referenced (see _forget_input): count its
        # units by the ops it ran, and check the bytes cover at least those units.
        stats = rank[1]["stats"]
        alive, peak = set(), 0
        for text in stats["executed_ops"]:
            if "F" in text:
                alive.add(text.replace("F", ","))
                peak = max(peak, len(alive))
            elif "B" in text:
                alive.discard(text.replace("B", ","))
        megatron.append(peak)
        assert stats["peak_saved_bytes"] >= peak * min(stats["unit_bytes"].values())
        offloaded.append(max(measured_units(rank[2]["stats"])))
    assert megatron == [11, 9, 7, 5]
    assert all(units <= 4 for units in offloaded), offloaded
    print(f"\npeak units per rank: Megatron interleaved {megatron}, "
          f"gis g=2 full offload {offloaded}")


def test_tied_embeddings_and_overlapped_grad_reduce(pool4):
    """DDP with overlap_grad_reduce (config.grad_sync_func per chunk, small buckets) and data
    parallelism 2, tied embeddings (finalize_model_grads' embedding all-reduce); unit and
    layer granularity (layer streaming along the GIS order)."""
    for case in (
        TinyGPTCase(pp=2, vpp=2, microbatches=4, num_layers=4, tie_embeddings=True,
                    overlap_grad_reduce=True, ddp_bucket_size=20_000),
        TinyGPTCase(pp=4, vpp=2, microbatches=5, num_layers=8, tie_embeddings=True,
                    microbatch_group_size=5),
        TinyGPTCase(pp=2, microbatches=3, num_layers=2, tie_embeddings=True,
                    overlap_grad_reduce=True),
    ):
        variants = [{"offload": None}, {"offload": gis("full", 1)}, {"offload": gis("full", 2)},
                    {"offload": gis("none", case.pp)}, {"offload": gis("full", 1, "layer")},
                    {"offload": gis("chunks1", 2, "layer")}]
        ranks = _run(pool4, case, variants)
        problems = _mismatches(ranks)
        assert not problems, f"{case.label()}: " + "\n".join(problems[:10])


def test_a_different_microbatch_count_on_each_call(pool4):
    for case, counts in (
        (TinyGPTCase(pp=2, vpp=2, microbatches=4, num_layers=4), [2, 6, 4]),
        (TinyGPTCase(pp=4, microbatches=4, num_layers=4), [1, 3, 6]),  # 1F1B takes any m
    ):
        variants = [{"offload": None, "microbatches": counts},
                    {"offload": gis("full", 1), "microbatches": counts},
                    {"offload": gis("chunks1", 3), "microbatches": counts}]
        ranks = _run(pool4, case, variants)
        problems = _mismatches(ranks)
        assert not problems, "\n".join(problems[:10])


def test_forward_only_evaluation(pool4):
    ranks = pool4.run("megatron_offload.testing.reference:run_forward_only",
                      case=TinyGPTCase(pp=4, vpp=2, microbatches=4), offload_config=gis("full", 2))
    assert any(rank["losses_unpatched"] for rank in ranks)
    for rank in ranks:
        assert rank["stats_recorded"] == 0
        assert rank["losses_patched"] == rank["losses_unpatched"]



@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_stuck_peer_fails_the_other_with_a_clear_error(mode):
    """Pipeline rank 1 exits abruptly (or stops) in the middle of an iteration; rank 0 must
    raise PeerTimeoutError naming the peer and the message within the timeout (5 s here)
    instead of hanging."""
    import multiprocessing

    from megatron_offload.testing.executor_cases import peer_failure_worker
    from megatron_offload.testing.pool import free_tcp_port

    report = os.path.join(tempfile.mkdtemp(), "rank0.txt")
    context = multiprocessing.get_context("spawn")
    port = free_tcp_port()
    procs = [context.Process(target=peer_failure_worker, args=(rank, port, report, mode),
                             daemon=True)
             for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        procs[0].join(120)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    with open(report) as handle:
        text = handle.read()
    assert text.startswith("PeerTimeoutError") and "pp rank 1" in text, text
    assert float(text.split("after ")[1].split(" s")[0]) < 25, text
    print(f"\n{mode}: {text[:300]}")


@pytest.mark.slow
def test_eight_stages():
    """p = 8 (the top of the supported range), v = 2, m = 8: bitwise and peaks = simulator."""
    with WorkerPool(8) as pool8:
        problems = check_matrix_variants(pool8, 8, 2, 8, [
            ("gis-g4-full", {"offload": gis("full", 4), "group": 4}),
            ("gis-g8-none", {"offload": gis("none", 8), "group": 8}),
            ("gis-g1-chunks1", {"offload": gis("chunks1", 1), "group": 1}),
        ])
    assert not problems, "\n".join(problems[:30])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"schedule": "zigzag"}, "--offload-schedule 'zigzag' is not a schedule"),
        ({"group_size": 2}, "--offload-group-size 2 only applies to --offload-schedule gis"),
        ({"schedule": "gis", "group_size": 0}, "--offload-group-size 0 must be an integer >= 1"),
        ({"schedule": "gis", "policy": "auto", "memory_budget_gib": 1.0},
         "--offload-policy auto is not supported with --offload-schedule gis"),
    ],
)
def test_bad_schedule_flags_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OffloadConfig(**kwargs)


def test_group_size_is_capped_at_the_microbatch_count():
    schedule = planned_schedule(4, 2, 3, min(4, 3), "full", None, "cpu")[0]
    assert schedule.group_size == 3 and schedule.microbatches == 3


def _realistic_rows():
    import test_realistic_matrix  # noqa: PLC0415 - the rows of the realistic matrix, same dir

    return test_realistic_matrix


@pytest.mark.slow
@pytest.mark.parametrize("row", range(15))
def test_realistic_rows_under_gis(pool4, row):
    """Every row of test_realistic_matrix (bf16 + fp32 main params, fused wgrad, overlapped
    grad reduce and param gather, distributed optimizer, recompute, RoPE/SwiGLU/GQA, MoE,
    sequence length changing between iterations, tied embeddings, Megatron's Adam) under
    gis with g = max(1, p / 2) and full offload, bitwise against unpatched Megatron."""
    from megatron_offload.testing.reference import compare_runs_per_rank

    rows = _realistic_rows()
    assert len(rows.ROWS) == 15
    case = rows.ROWS[row].values[0]
    config = OffloadConfig(policy="full", min_offload_bytes=0, measure_memory=True, schedule="gis",
                           group_size=max(1, case.pp // 2))  # --offload-granularity layer (default)
    pool = _pool(4, pool4)
    reference = pool.run(RUN_CASE, case=case, iterations=3, offload_config=None, timeout=120)
    patched = pool.run(RUN_CASE, case=case, iterations=3, offload_config=config, timeout=120)
    problems = compare_runs_per_rank(reference, patched) + rows.check_offload_moved_bytes(patched)
    assert not problems, f"{case.label()}: " + "\n".join(problems[:20])
