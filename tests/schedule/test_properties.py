"""Random p, v, m, g, k and costs: schedules validate, simulation ends, offload never hurts."""
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.costs import CostModel
from megatron_offload.schedule.offload import plan_offload
from megatron_offload.schedule.simulate import simulate
from megatron_offload.schedule.validate import validate_schedule

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    pp = draw(st.integers(1, 6))
    vpp = draw(st.integers(1, 3))
    m = draw(st.integers(1, 12))
    g = draw(st.integers(1, m))
    forward = tuple(draw(st.sampled_from([0.5, 1.0, 1.5])) for _ in range(vpp))
    backward = tuple(draw(st.sampled_from([1.0, 2.0, 3.0])) for _ in range(vpp))
    costs = CostModel(
        forward_time=forward,
        backward_time=backward,
        p2p_latency=draw(st.sampled_from([0.0, 0.1])),
        offload_ratio=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0, 1.5, 3.0])),
        shared_link=draw(st.booleans()),
    )
    chunks = draw(st.one_of(st.none(), st.integers(0, vpp)))
    return pp, vpp, m, g, costs, chunks


@SETTINGS
@given(cases())
def test_gis_validates_and_offload_never_hurts(case):
    pp, vpp, m, g, costs, chunks = case
    schedule = validate_schedule(make_schedule("gis", pp, vpp, m, g))
    plan = plan_offload(schedule, costs, chunks=chunks)
    validate_schedule(plan.schedule)
    assert plan.schedule.without_offload() == schedule
    result = simulate(plan.schedule, costs)
    for after, before in zip(result.peak_units, plan.baseline.peak_units):
        assert after <= before
    assert result.makespan >= plan.baseline.makespan - 1e-9
    assert result.slowdown >= -1e-9


@SETTINGS
@given(cases())
def test_megatron_orders_validate_where_accepted(case):
    pp, vpp, m, g, costs, chunks = case
    kind = "1f1b" if vpp == 1 else "interleaved"
    try:
        schedule = make_schedule(kind, pp, vpp, m, g)
    except ValueError:
        return  # Megatron refuses this combination; the refusal is tested elsewhere
    validate_schedule(schedule)
    plan = plan_offload(schedule, costs, chunks=chunks)
    result = simulate(validate_schedule(plan.schedule), costs)
    assert all(a <= b for a, b in zip(result.peak_units, plan.baseline.peak_units))
    assert result.makespan >= plan.baseline.makespan - 1e-9


@SETTINGS
@given(cases(), st.integers(0, 8))
# Found by hypothesis: on a shared link the pass's per-link estimate met the target while
# the simulator peaked one unit higher (plan_offload now re-aims the ranks that missed).
@example(case=(5, 2, 5, 3, CostModel(forward_time=(0.5, 1.0), backward_time=(1.0, 1.0),
                                     offload_ratio=0.3, shared_link=True), None), target=3)
def test_memory_target_is_met_or_everything_possible_is_offloaded(case, target):
    pp, vpp, m, g, costs, _ = case
    schedule = make_schedule("gis", pp, vpp, m, g)
    full = plan_offload(schedule, costs)
    aimed = plan_offload(schedule, costs, memory_target=target)
    result = simulate(validate_schedule(aimed.schedule), costs)
    full_result = simulate(full.schedule, costs)
    for rank in range(pp):
        assert (result.peak_units[rank] <= max(target, full_result.peak_units[rank])
                or len(aimed.offloaded[rank]) == len(full.offloaded[rank]))
        assert len(aimed.offloaded[rank]) <= len(full.offloaded[rank])
