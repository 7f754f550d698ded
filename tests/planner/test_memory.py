"""Byte-weighted memory sweeps over a simulated schedule (schedule/memory.py)."""
from __future__ import annotations

import pytest

from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.costs import CostModel
from megatron_offload.schedule.memory import byte_peaks
from megatron_offload.schedule.offload import plan_offload
from megatron_offload.schedule.simulate import simulate


@pytest.mark.parametrize("kind, pp, vpp, m, g", [("1f1b", 4, 1, 8, None),
                                                 ("interleaved", 4, 2, 8, 4), ("gis", 8, 2, 16, 4)])
@pytest.mark.parametrize("k", [None, 0.5, 1.5])
def test_uniform_bytes_equal_units(kind, pp, vpp, m, g, k):
    costs = CostModel(forward_time=1.0, backward_time=2.0, offload_ratio=k or 1.0)
    schedule = make_schedule(kind, pp, vpp, m, g)
    sim = simulate(schedule, costs)
    if k is not None:
        plan = plan_offload(schedule, costs, baseline=sim)
        sim = simulate(plan.schedule, costs, no_offload_makespan=sim.makespan)
    ones = [[1.0] * vpp for _ in range(pp)]
    device, host = byte_peaks(sim, ones)
    assert device == sim.peak_units
    if k is None:
        assert host == [0.0] * pp
    else:
        assert all(h >= 1 for h, units in zip(host, [len(sim.schedule.offloaded_units(r))
                                                     for r in range(pp)]) if units)


def test_weights_per_rank_and_chunk_and_what_stays_behind():
    costs = CostModel(forward_time=1.0, backward_time=2.0, offload_ratio=0.5)
    schedule = make_schedule("interleaved", 4, 2, 8)
    base = simulate(schedule, costs)
    twice = [[2.0, 2.0] for _ in range(4)]
    assert byte_peaks(base, twice)[0] == [2 * u for u in base.peak_units]
    plan = plan_offload(schedule, costs, baseline=base)
    sim = simulate(plan.schedule, costs, no_offload_makespan=base.makespan)
    moved_all, _ = byte_peaks(sim, twice)
    moved_half, host_half = byte_peaks(sim, twice, [[1.0, 1.0] for _ in range(4)])
    moved_none, host_none = byte_peaks(sim, twice, [[0.0, 0.0] for _ in range(4)])
    # nothing moves: as without offload
    assert moved_none == byte_peaks(base, twice)[0] and host_none == [0.0] * 4
    for a, b, c in zip(moved_all, moved_half, moved_none):
        assert a <= b <= c
    assert max(host_half) > 0


def test_offload_pass_takes_a_target_per_rank():
    """plan_offload's memory target may differ per rank (the planner aims each rank at what its
    own bytes allow); the same number for every rank gives the single-target result."""
    costs = CostModel(forward_time=1.0, backward_time=2.0, offload_ratio=0.5)
    schedule = make_schedule("interleaved", 4, 2, 8)
    base = simulate(schedule, costs)
    same = plan_offload(schedule, costs, memory_target=6, baseline=base)
    listed = plan_offload(schedule, costs, memory_target=[6, 6, 6, 6], baseline=base)
    assert same.offloaded == listed.offloaded
    targets = [4, 8, 5, 5]
    plan = plan_offload(schedule, costs, memory_target=targets, baseline=base)
    peaks = simulate(plan.schedule, costs, no_offload_makespan=base.makespan).peak_units
    everything = simulate(plan_offload(schedule, costs, baseline=base).schedule, costs).peak_units
    for rank, (peak, target) in enumerate(zip(peaks, targets)):
        assert peak <= target or peak == everything[rank]
    assert len(plan.offloaded[1]) < len(same.offloaded[1])  # rank 1 aims higher: offloads less
    with pytest.raises(ValueError, match="one per rank"):
        plan_offload(schedule, costs, memory_target=[1, 2], baseline=base)
