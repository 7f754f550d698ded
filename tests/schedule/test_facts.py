"""The memory and makespan facts of pipeoffload.md, checked on the simulator."""
import math

import pytest

from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.costs import CostModel
from megatron_offload.schedule.offload import plan_offload
from megatron_offload.schedule.simulate import simulate
from megatron_offload.schedule.validate import validate_schedule

UNIFORM = [CostModel(forward_time=1.0, backward_time=1.0),
           CostModel(forward_time=1.0, backward_time=2.0)]


@pytest.mark.parametrize("costs", UNIFORM)
@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 17])
def test_1f1b_rank_peak(costs, pp, m):
    result = simulate(make_schedule("1f1b", pp, 1, m), costs)
    assert result.peak_units == [min(pp - r, m) for r in range(pp)]


@pytest.mark.parametrize("costs", UNIFORM)
def test_interleaved_rank0_peak(costs):
    for pp in (2, 3, 4, 8):
        for vpp in (2, 3, 4):
            for m in (pp, 2 * pp, 3 * pp):
                for g in sorted({pp, m}):
                    peak = simulate(make_schedule("interleaved", pp, vpp, m, g),
                                    costs).peak_units[0]
                    assert peak == min(2 * (pp - 1) + (vpp - 1) * g + 1, m * vpp), (pp, vpp, m, g)


def test_interleaved_measured_on_megatron():  # pipeoffload.md section 1: 11 / 9 / 7 / 5
    assert simulate(make_schedule("interleaved", 4, 2, 8)).peak_units == [11, 9, 7, 5]


@pytest.mark.parametrize("costs", UNIFORM)
def test_gis_full_group_peak_and_makespan(costs):
    for pp in (2, 3, 4, 8):
        for vpp in (1, 2, 3, 4):
            for m in (pp, 2 * pp, 3 * pp + 1):
                gis = simulate(make_schedule("gis", pp, vpp, m, pp), costs)
                assert max(gis.peak_units) <= pp * vpp, (pp, vpp, m)
                if m % pp == 0 or m % pp >= pp:  # where Megatron accepts g = p
                    megatron = simulate(make_schedule("interleaved" if vpp > 1 else "1f1b", pp, vpp,
                                                      m, pp if vpp > 1 else None), costs)
                    assert gis.makespan == megatron.makespan, (pp, vpp, m)


@pytest.mark.parametrize("costs", UNIFORM)
def test_gis_half_group_peak(costs):
    for pp in (2, 3, 4, 5, 8, 16):
        for vpp in (1, 2, 3, 4):
            for m in (pp, 2 * pp, 4 * pp):
                g = math.ceil(pp / 2)
                peak = max(simulate(make_schedule("gis", pp, vpp, m, g), costs).peak_units)
                assert peak <= math.ceil((vpp + 1) * pp / 2) + 1, (pp, vpp, m)


def test_gis_half_group_bound_fails_for_five_chunks_odd_pp():
    # The bound ceil((v+1)p/2)+1 is a v <= 4 fact: rank 0 warms up (v-1)ceil(p/2) + p - 1
    # forwards, which for odd p is ((v+1)p + v - 1)/2 + ... > bound once v >= 5.
    pp, vpp = 3, 5
    peak = simulate(make_schedule("gis", pp, vpp, 4 * pp, 2)).peak_units[0]
    assert peak == (vpp - 1) * 2 + pp == 11 > math.ceil((vpp + 1) * pp / 2) + 1 == 10


@pytest.mark.parametrize("costs", UNIFORM)
@pytest.mark.parametrize("pp", [4, 8, 16, 32])
@pytest.mark.parametrize("vpp", [2, 3])
@pytest.mark.parametrize("kind", ["gis", "interleaved"])
def test_full_offload_fast_link_keeps_a_few_units(costs, pp, vpp, kind):
    schedule = make_schedule(kind, pp, vpp, 2 * pp, pp)
    fast = CostModel(forward_time=costs.forward_time, backward_time=costs.backward_time,
                     offload_ratio=0.5)
    plan = plan_offload(schedule, fast)
    result = simulate(plan.schedule, fast, no_offload_makespan=plan.baseline.makespan)
    assert max(result.peak_units) <= 4, result.peak_units
    assert result.makespan == plan.baseline.makespan


@pytest.mark.parametrize("costs", UNIFORM)
@pytest.mark.parametrize("pp", [16, 32])
@pytest.mark.parametrize("k", [0.25, 0.5])
def test_offloading_chunk0_cuts_more_than_half(costs, pp, k):
    schedule = make_schedule("gis", pp, 2, 2 * pp, math.ceil(pp / 2))
    link = CostModel(forward_time=costs.forward_time, backward_time=costs.backward_time,
                     offload_ratio=k)
    plan = plan_offload(schedule, link, chunks=1)
    before = plan.baseline.peak_units[0]
    after = simulate(plan.schedule, link).peak_units[0]
    assert after < before / 2, (before, after)


# pipeoffload.md section 4, p=8 v=2 m=16 f=1 b=2: (peak on rank 0, makespan) per cell.
SECTION_4 = {
    ("interleaved", 8): [(23, 117), (10, 117), (2, 117), (9, 117), (14, 126)],
    ("gis", 8): [(16, 117), (8, 117), (2, 117), (7, 118), (10, 127.5)],
    ("gis", 4): [(12, 141), (6, 141), (2, 141), (4, 141), (6, 141)],
}
COLUMNS = [(0, 1.0), (1, 0.5), (2, 0.5), (2, 1.0), (2, 1.5)]  # (offloaded chunks, k)


@pytest.mark.parametrize("kind,g", list(SECTION_4))
def test_section_4_table_matched_or_beaten(kind, g):
    schedule = make_schedule(kind, 8, 2, 16, g)
    for (chunks, k), (peak, makespan) in zip(COLUMNS, SECTION_4[(kind, g)]):
        costs = CostModel(forward_time=1.0, backward_time=2.0, offload_ratio=k)
        plan = plan_offload(schedule, costs, chunks=chunks)
        result = simulate(plan.schedule, costs)
        assert result.peak_units[0] <= peak and result.makespan <= makespan, (
            chunks, k, result.peak_units[0], result.makespan)


def test_every_gis_schedule_validates_small_grid():
    for pp in range(1, 7):
        for vpp in range(1, 4):
            for m in range(1, 3 * pp + 2):
                for g in range(1, m + 1):
                    validate_schedule(make_schedule("gis", pp, vpp, m, g))


def test_gis_without_dry_run_shapes_validate_up_to_p8():
    for pp in range(2, 9):
        for vpp in (2, 4):
            for m in range(pp, 3 * pp + 2):
                for g in range(pp, m + 1):
                    if m % g == 0 or m % g >= pp:
                        validate_schedule(make_schedule("gis", pp, vpp, m, g))
