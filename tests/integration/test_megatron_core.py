"""The plugin under megatron-core's own schedules, against the same run without it.

Every case runs the same tiny GPT, weights and data twice in the same four gloo ranks: once
through Megatron's unpatched schedules, once with ``install(OffloadConfig(...))``. Loss and
every gradient must be bitwise identical; memory is measured, not assumed.
"""
from __future__ import annotations

import types

import pytest

from megatron_offload import releases
from megatron_offload.config import OffloadConfig
from megatron_offload.integration import megatron_core
from megatron_offload.planning.policy import runtime_schedule
from megatron_offload.schedule.megatron import megatron_schedule
from megatron_offload.testing.gpt import TinyGPTCase
from megatron_offload.testing.reference import SAFE_FAULT_PP2_M4, compare_runs

RUN_CASE = "megatron_offload.testing.reference:run_case"
FULL = OffloadConfig(policy="full", granularity="unit", min_offload_bytes=0, measure_memory=True)


def run(pool, case, offload=None, iterations=3, **kwargs):
    return pool.run(RUN_CASE, case=case, iterations=iterations, offload_config=offload, **kwargs)


def assert_bitwise(pool, case, offload=FULL, iterations=3):
    reference = run(pool, case, None, iterations)
    patched = run(pool, case, offload, iterations)
    mismatches = compare_runs(reference, patched)
    assert not mismatches, "\n".join(mismatches[:20])
    assert any(it["loss"] is not None for r in patched for it in r["iterations"])
    return patched


# m = p, 2p, and (1F1B only) one not divisible by p. Interleaving with the default group size
# g = p cannot take such an m: Megatron requires m % g to be 0 or >= p.
EQUIVALENCE_CASES = [
    # PP=1 (forward_backward_no_pipelining): every backward follows its forward, nothing moves
    pytest.param(TinyGPTCase(pp=1, microbatches=4), id="pp1-no-pipelining"),
    pytest.param(TinyGPTCase(pp=2, microbatches=2), id="pp2-1f1b-m2"),
    pytest.param(TinyGPTCase(pp=2, microbatches=4), id="pp2-1f1b-m4"),
    pytest.param(TinyGPTCase(pp=2, microbatches=5), id="pp2-1f1b-m5"),
    pytest.param(TinyGPTCase(pp=4, microbatches=4), id="pp4-1f1b-m4"),
    pytest.param(TinyGPTCase(pp=4, microbatches=8), id="pp4-1f1b-m8"),
    pytest.param(TinyGPTCase(pp=4, microbatches=6), id="pp4-1f1b-m6"),
    pytest.param(
        TinyGPTCase(pp=2, vpp=2, microbatches=2, overlap_p2p_comm=True, batch_p2p_comm=False),
        id="pp2-vpp2-m2-overlap",
    ),
    pytest.param(
        TinyGPTCase(pp=2, vpp=2, microbatches=4, overlap_p2p_comm=True, batch_p2p_comm=False),
        id="pp2-vpp2-m4-overlap",
    ),
    pytest.param(TinyGPTCase(pp=4, vpp=2, microbatches=4), id="pp4-vpp2-m4"),
    pytest.param(TinyGPTCase(pp=4, vpp=2, microbatches=8), id="pp4-vpp2-m8"),
    pytest.param(TinyGPTCase(pp=4, vpp=2, microbatches=8, tie_embeddings=True), id="pp4-vpp2-tied"),
    pytest.param(TinyGPTCase(pp=2, microbatches=4, tie_embeddings=True), id="pp2-1f1b-tied"),
    pytest.param(TinyGPTCase(pp=4, microbatches=8, recompute="full"), id="pp4-1f1b-recompute-full"),
    pytest.param(
        TinyGPTCase(pp=4, vpp=2, microbatches=8, recompute="full"), id="pp4-vpp2-recompute-full"
    ),
    pytest.param(
        TinyGPTCase(pp=2, vpp=2, microbatches=4, recompute="selective"),
        id="pp2-vpp2-recompute-selective",
    ),
    pytest.param(
        TinyGPTCase(pp=4, microbatches=4, recompute="selective"), id="pp4-1f1b-recompute-selective"
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", EQUIVALENCE_CASES)
def test_full_offload_is_bitwise_identical_to_unpatched_megatron(pool4, case):
    patched = assert_bitwise(pool4, case)
    for rank in patched:
        for stats in rank["offload_stats"]:
            # something really moved on every rank where a unit outlives its reload distance
            # (1 op: a unit reloaded as the next op starts would free nothing, and stays)
            if any(unit_lifespan > 1 for unit_lifespan in _lifespans(stats["rank_order"])):
                assert stats["offloaded_bytes"] > 0
                assert (stats["offloaded_bytes"] == stats["reloaded_bytes"]
                        or stats["iteration"] == 0)


def test_chunks_policy_is_bitwise_identical(pool4):
    assert_bitwise(
        pool4,
        TinyGPTCase(pp=4, vpp=2, microbatches=8),
        OffloadConfig(policy="chunks", offload_chunks=1, min_offload_bytes=0),
        iterations=2,
    )


def _lifespans(rank_order: str) -> list[int]:
    from megatron_offload.planning.policy import unit_lifespans
    from megatron_offload.schedule.ir import Op

    return list(unit_lifespans([Op.parse(t) for t in rank_order.split()]).values())


def _in_flight_at_peak(rank_order: str, unit_bytes: dict) -> tuple[int, int]:
    """(units alive, their bytes) at the sample with the most units alive (Megatron order)."""
    from megatron_offload.schedule.ir import Op

    alive: set = set()
    best = (0, 0)
    for op in (Op.parse(t) for t in rank_order.split()):
        if op.kind.value == "F":
            alive.add(op.unit)
            total = sum(unit_bytes[f"{c},{m}"] for c, m in alive)
            best = max(best, (len(alive), total))
        else:
            alive.discard(op.unit)
    return best


def test_measured_memory_none_full_chunks(pool4):
    """Unit granularity, PP=4 VPP=2 m=8: Megatron keeps 11/9/7/5 units alive on ranks 0..3;
    full offload keeps about two (the unit just produced and the one prefetched); chunk 0 only
    lies between. (Layer granularity: test_megatron_layer_streaming.py.)"""
    case = TinyGPTCase(pp=4, vpp=2, microbatches=8)
    measured = {}
    for name, config in {
        "none": OffloadConfig(policy="none", granularity="unit", measure_memory=True,
                              min_offload_bytes=0),
        "full": FULL,
        "chunks": OffloadConfig(
            policy="chunks", offload_chunks=1, granularity="unit", measure_memory=True,
            min_offload_bytes=0
        ),
    }.items():
        ranks = sorted(run(pool4, case, config, iterations=2), key=lambda r: r["pp_rank"])
        measured[name] = [r["offload_stats"][-1] for r in ranks]
        # The runtime issued exactly the ops of the schedule IR the simulator scores.
        planned = runtime_schedule(megatron_schedule("interleaved", 4, 2, 8), config)
        for rank, stats in enumerate(measured[name]):
            assert stats["executed_ops"] == [str(op) for op in planned.ranks[rank]]

    # One hidden-state tensor (a chunk output or a received input). Besides the units, the
    # schedule keeps a few of these alive: outputs until their asynchronous send is waited
    # (overlap_p2p_comm), and, measured, up to two received inputs of units whose backward
    # already ran, still referenced by the schedule's p2p bookkeeping until its next exchange.
    p2p_buffer = case.seq_length * case.micro_batch_size * case.hidden_size * 4
    for rank, (none, full, chunks) in enumerate(zip(*measured.values())):
        units, in_flight_bytes = _in_flight_at_peak(none["rank_order"], none["unit_bytes"])
        assert units == [11, 9, 7, 5][rank]
        # Without offload: exactly the units Megatron keeps, plus at most two p2p buffers.
        assert in_flight_bytes <= none["peak_saved_bytes"] <= in_flight_bytes + 2 * p2p_buffer
        # Full offload: the unit just produced and the one prefetched for the next backward.
        largest_unit = max(none["unit_bytes"].values())
        assert full["peak_saved_bytes"] <= 2 * largest_unit + 2 * p2p_buffer
        for measure in (none, full):  # outputs whose sends are in flight: at most two
            assert measure["peak_resident_bytes"] - measure["peak_saved_bytes"] <= 2 * p2p_buffer
        assert full["peak_resident_bytes"] < none["peak_resident_bytes"]
        if rank < 3:  # the last rank's chunk-0 units are the only ones with a lifespan there
            assert full["peak_resident_bytes"] < chunks["peak_resident_bytes"]
            assert chunks["peak_resident_bytes"] < none["peak_resident_bytes"]
            assert full["offloaded_bytes"] > chunks["offloaded_bytes"] > 0
        else:  # last rank: chunk 1 runs each backward right after its forward
            assert full["offloaded_bytes"] == chunks["offloaded_bytes"] > 0
        assert none["offloaded_bytes"] == 0


def test_host_pool_stops_growing(pool4):
    case = TinyGPTCase(pp=4, vpp=2, microbatches=8)
    ranks = run(pool4, case, OffloadConfig(policy="full", min_offload_bytes=0), iterations=5)
    for rank in ranks:
        sizes = [s["host_pool_bytes"] for s in rank["offload_stats"]]
        buffers = [s["host_pool_buffers"] for s in rank["offload_stats"]]
        assert sizes[0] > 0
        assert sizes == [sizes[0]] * 5 and buffers == [buffers[0]] * 5, sizes


def test_fault_mid_schedule_leaves_no_state(pool4):
    case = TinyGPTCase(pp=2, microbatches=4)
    reference = run(pool4, case, None, iterations=3)
    faulted = run(pool4, case, FULL, iterations=3, fault=SAFE_FAULT_PP2_M4)
    assert all(len(r["faults"]) == 1 and "injected" in r["faults"][0]
               for r in faulted if r["dp_rank"] == 0)
    # the runtime released everything when the step raised...
    assert all(r["offload_clean_after_fault"] for r in faulted)
    # ...and the rerun of that iteration (and the next) is bitwise correct
    mismatches = compare_runs(reference, faulted)
    assert not mismatches, "\n".join(mismatches[:20])


def test_forward_only_passes_through(pool4):
    ranks = pool4.run(
        "megatron_offload.testing.reference:run_forward_only",
        case=TinyGPTCase(pp=4, vpp=2, microbatches=4),
        offload_config=FULL,
    )
    for rank in ranks:
        assert rank["stats_recorded"] == 0
        assert rank["losses_patched"] == rank["losses_unpatched"]


def test_offload_chunks_outside_range_fails_before_the_first_step(pool4):
    with pytest.raises(Exception, match=r"--offload-chunks 3 is outside 0\.\.2") as info:
        run(
            pool4,
            TinyGPTCase(pp=2, vpp=2, microbatches=2),
            OffloadConfig(policy="chunks", offload_chunks=3),
            iterations=1,
        )
    # Raised by the schedule wrapper's checks, before any step reached the runtime.
    assert "check_against_model" in str(info.value)
    assert "run_forward" not in str(info.value)


# ---------------------------------------------------------------- in-process (no ranks)
def test_install_uninstall_restores_every_function():
    from megatron.core.pipeline_parallel import schedules

    names = ["forward_step", "backward_step", *megatron_core._SCHEDULE_FUNCTIONS]
    originals = {n: getattr(schedules, n) for n in names}
    megatron_core.install(OffloadConfig(policy="full"))
    try:
        megatron_core.install(OffloadConfig(policy="none"))  # idempotent: re-wraps originals
        for n in names:
            patched = getattr(schedules, n)
            assert patched is not originals[n]
            assert patched.__wrapped__ is originals[n]
    finally:
        megatron_core.uninstall()
    assert {n: getattr(schedules, n) for n in names} == originals
    megatron_core.uninstall()  # a second uninstall is a no-op


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("overlap_moe_expert_parallel_comm", True, "--overlap-moe-expert-parallel-comm"),
        ("cuda_graph_impl", "local", "--cuda-graph-impl"),
        ("enable_cuda_graph", True, "--enable-cuda-graph"),
        ("cpu_offloading", True, "--cpu-offloading"),
        ("fine_grained_activation_offloading", True, "--fine-grained-activation-offloading"),
    ],
)
def test_unsupported_modes_are_refused(field, value, flag):
    config = types.SimpleNamespace(**{field: value})
    with pytest.raises(ValueError, match=flag):
        megatron_core.refuse_unsupported(config)


def test_unsupported_megatron_version_is_refused():
    with pytest.raises(ValueError, match=r"megatron-core 0\.15\.2 is not supported.*0\.16"):
        releases.check_megatron_version("0.15.2")
    assert releases.check_megatron_version("0.16.1") == "0.16.1"


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"policy": "sometimes"}, "--offload-policy"),
        ({"policy": "chunks"}, "--offload-chunks"),
        ({"policy": "chunks", "offload_chunks": -1}, "--offload-chunks"),
        ({"policy": "full", "offload_chunks": 1}, "--offload-chunks"),
        ({"backend": "tpu"}, "--offload-backend"),
        ({"prefetch_distance": 0, "granularity": "unit"}, "--offload-prefetch"),
        ({"prefetch_distance": -1}, "--offload-prefetch"),
        ({"granularity": "tensor"}, "--offload-granularity"),
    ],
)
def test_bad_config_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        OffloadConfig(**kwargs)


# ------------------------------------------------ uninstall() during an iteration (in-process)
def test_uninstall_during_an_iteration_is_refused():
    runtime = megatron_core.install(OffloadConfig(policy="full"))
    runtime.active = True  # what the patched schedule sets while its steps run
    try:
        with pytest.raises(RuntimeError, match="between iterations"):
            megatron_core.uninstall()
    finally:
        runtime.active = False
        megatron_core.uninstall()
    from megatron.core.pipeline_parallel import schedules

    assert not hasattr(schedules.forward_step, "__wrapped__")


def test_training_step_from_a_schedule_fetched_before_install_is_an_error():
    """A schedule function bound before install() calls the patched forward_step with the
    runtime inactive: that would train without offloading, silently."""
    import torch
    from megatron.core.pipeline_parallel import schedules

    megatron_core.install(OffloadConfig(policy="full"))
    try:
        with pytest.raises(RuntimeError, match=r"fetched .*before install\(\)"):
            schedules.forward_step(
                forward_step_func=None, data_iterator=None, model=None, num_microbatches=1,
                input_tensor=None, forward_data_store=[], config=None, cp_group_size=1,
                current_microbatch=0,
            )
        with torch.no_grad():  # an evaluation pass (forward only, no grad) passes through
            with pytest.raises(Exception) as info:
                schedules.forward_step(
                    forward_step_func=None, data_iterator=None, model=None,
                    num_microbatches=1, input_tensor=None, forward_data_store=[], config=None,
                    cp_group_size=1, current_microbatch=0,
                )
            assert "before install" not in str(info.value)  # reached Megatron's own code
    finally:
        megatron_core.uninstall()
