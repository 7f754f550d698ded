"""The selective offload pass against the simple rule of issue 8.

Simple rule (:func:`simple_rule_offload`): offload every unit of a chunk < K whose lifespan
without offload exceeds two transfer times (D2H + H2D), reload just in time; copies the link
cannot hide stall compute, as the simulator times them.

Issue 8 asks: for random (p, v, m, g, K, k), on every rank peak(pass) <= peak(simple) and
makespan(pass) <= makespan(simple). Findings (see the tests below):

- makespan(pass) <= makespan(simple) always holds: the pass keeps only copies the link hides,
  so its makespan is the no-offload one, and offload never speeds compute up.
- Where the rule stalls no compute op, the pass offloads the same units and peaks no higher
  on private links. This failed
  before the pass accepted copies that abut exactly (it wanted a gap of 1e-9 x makespan
  between consecutive reloads, and between an offload's end and its reload's start, which
  refused exact fits the simulator hides with no stall); pinned below as an explicit example.
- The full statement is false: when the link cannot hide every long-lived unit, the rule
  offloads them anyway and buys a lower peak with a longer makespan, which a pass that never
  stalls cannot match; the pinned counterexample is asserted (test_trade_off_counterexample).
- The rule can also win at equal makespan: its stall falls into slack before the next
  dependency (a bubble) and the makespan does not move; the pass refuses any stall (its
  deadlines are the baseline's backward starts). Found on private and on shared links; asserted.
  And the pass itself can stall there (its FIFO model of the shared D2H lane is not the
  simulator's event-order lane): a pre-existing defect, asserted as it is, not fixed here.
  The random properties therefore run on private links.
"""
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.costs import CostModel
from megatron_offload.schedule.offload import plan_offload, simple_rule_offload
from megatron_offload.schedule.simulate import simulate
from megatron_offload.schedule.validate import validate_schedule

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def cases(draw):
    """(kind, p, v, m, g, K, k): gis with g in 1..m, or Megatron's interleaved order where
    Megatron accepts the shape (1F1B for v = 1)."""
    kind = draw(st.sampled_from(["gis", "interleaved"]))
    pp = draw(st.integers(2, 8))
    vpp = draw(st.integers(1, 4))
    if kind == "gis":
        m = draw(st.integers(1, 3 * pp))
        g = draw(st.integers(1, m))
    elif vpp == 1:
        kind, m, g = "1f1b", draw(st.integers(1, 3 * pp)), None
    else:
        m = draw(st.integers(pp, 3 * pp))
        g = draw(st.integers(pp, m))
        assume(not 0 < m % g < pp)  # Megatron refuses a short last group
    chunks = draw(st.integers(0, vpp))
    ratio = draw(st.floats(0.25, 3.0))
    return kind, pp, vpp, m, g, chunks, ratio


def _both(kind, pp, vpp, m, g, chunks, ratio, shared=False):
    schedule = make_schedule(kind, pp, vpp, m, g)
    costs = CostModel(offload_ratio=ratio, shared_link=shared)
    selective = plan_offload(schedule, costs, chunks=chunks)
    simple = simple_rule_offload(schedule, costs, chunks=chunks, baseline=selective.baseline)
    return (
        selective,
        simulate(validate_schedule(selective.schedule), costs),
        simple,
        simulate(validate_schedule(simple.schedule), costs),
    )


def _tol(*sims):
    return 1e-9 * max(max(s.makespan for s in sims), 1.0)


# Found by this test before the fix: reloads of 0B0 and 0B1 on every rank abut exactly
# ([13, 16] and [16, 19] on rank 0); the pass kept one unit per rank and peaked [4, 4, 3], the
# rule [3, 3, 3] at the same makespan 21.
FIXED = ("gis", 3, 2, 2, 2, 1, 2.0)
# Smallest trade-off found: the rule peaks [5, 4] at makespan 25.5, the pass [5, 5] at 21.
TRADE_OFF = ("interleaved", 2, 3, 2, 2, 3, 1.5)
# Shared link: the rule peaks [2, 2, 2, 2] with a stall that a bubble absorbs (makespan 96
# either way); the pass, which refuses any stall, peaks [3, 2, 3, 2].
SHARED = ("gis", 4, 3, 9, 3, 3, 0.25)
# Shared link, found by hypothesis: the pass offloads 4 units on rank 0 and 1 on rank 1; the
# simulator places rank 0's four offloads on the shared D2H lane first ([1, 7]), rank 1's at
# [7, 8.5] instead of the pass's [2.5, 4], so rank 1's reload ends at 10, its backward stalls
# and the makespan grows from 21 to 23 (before and after the exact-fit change).
SHARED_STALL = ("gis", 4, 1, 4, 1, 1, 1.0)
# Private links, found by hypothesis after the fix: on rank 0 the reloads of 0B0 ([48.75, 51])
# and 0B1 ([50.75, 53]) overlap by 0.25; the rule runs both and 0B1 starts 0.25 late, which
# the slack before 0B2 absorbs (makespan 84 either way); the pass keeps 0B1's unit only and
# peaks [11, 10, 9, 8] against the rule's [10, 9, 8, 7].
ABSORBED = ("gis", 4, 4, 4, 3, 1, 1.5)


@SETTINGS
@given(cases())
@example(FIXED)
@example(TRADE_OFF)
def test_pass_is_never_slower_than_the_simple_rule(case):
    """Private links (one D2H and one H2D lane per rank); shared links: see the known-limit tests
    below."""
    selective, a, simple, b = _both(*case)
    assert a.makespan <= b.makespan + _tol(a, b)
    assert a.makespan <= selective.baseline.makespan + _tol(a)  # the pass hides every copy
    assert b.makespan >= simple.baseline.makespan - _tol(b)  # the rule can only stall


def _stalls(sim, baseline) -> bool:
    """Whether any compute op of ``sim`` starts later than in ``baseline`` (same compute order)."""
    for rank, ops in enumerate(baseline.schedule.ranks):
        when = dict(zip(ops, baseline.start[rank]))
        tol = _tol(sim, baseline)
        if any(op in when and start > when[op] + tol
               for op, start in zip(sim.schedule.ranks[rank], sim.start[rank])):
            return True
    return False


@SETTINGS
@given(cases())
@example(FIXED)
@example(TRADE_OFF)
@example(ABSORBED)
def test_pass_is_not_dominated_by_the_simple_rule(case):
    """Private links: where the rule stalls no compute op (the link hides all its copies), the
    pass offloads every unit the rule does and peaks no higher on any rank."""
    selective, a, simple, b = _both(*case)
    if not _stalls(b, selective.baseline):
        assert [set(x) for x in selective.offloaded] == [set(x) for x in simple.offloaded]
        assert all(x <= y for x, y in zip(a.peak_units, b.peak_units)), (
            a.peak_units, b.peak_units, a.makespan, b.makespan)


@pytest.mark.parametrize("case, shared", [(ABSORBED, False), (SHARED, True)])
def test_rule_wins_at_equal_makespan_when_slack_absorbs_its_stall(case, shared):
    """Known limit of the pass (not a pass): the rule's stall falls into slack before the next
    dependency, so the makespan does not move, while the pass refuses any stall (its deadlines
    are the baseline's backward starts). A pass that learns each backward's slack turns this
    assertion false: then make it the property."""
    _, a, _, b = _both(*case, shared=shared)
    assert a.makespan == b.makespan
    assert any(x > y for x, y in zip(a.peak_units, b.peak_units)), (a.peak_units, b.peak_units)


def test_exact_fit_regression():
    selective, a, simple, b = _both(*FIXED)
    assert a.makespan == b.makespan == 21.0
    assert a.peak_units == b.peak_units == [3, 3, 3]
    assert (
        [len(units) for units in selective.offloaded]
        == [len(units) for units in simple.offloaded]
        == [2, 2, 2]
    )


def test_trade_off_counterexample():
    _, a, _, b = _both(*TRADE_OFF)
    assert (a.peak_units, a.makespan) == ([5, 5], 21.0)
    assert (b.peak_units, b.makespan) == ([5, 4], 25.5)


def test_shared_link_pass_stalls_known_defect():
    """Known defect (not fixed): on a link shared by two ranks the pass plans the D2H lane
    first-in-first-out in issue order, the simulator serves it in event order, so a copy the
    pass counts as hidden stalls (21 -> 23). Fixing the pass's lane model turns this false."""
    selective, a, _, _ = _both(*SHARED_STALL, shared=True)
    assert selective.baseline.makespan == 21.0 and a.makespan == 23.0


@SETTINGS
@given(cases())
def test_simple_rule_offloads_exactly_the_long_lived_candidates(case):
    kind, pp, vpp, m, g, chunks, ratio = case
    schedule = make_schedule(kind, pp, vpp, m, g)
    costs = CostModel(offload_ratio=ratio)
    plan = simple_rule_offload(schedule, costs, chunks=chunks)
    assert validate_schedule(plan.schedule).without_offload() == schedule
    base = plan.baseline
    for rank in range(pp):
        ops = schedule.ranks[rank]
        f_end = {op.unit: base.end[rank][i] for i, op in enumerate(ops) if op.kind.value == "F"}
        b_start = {op.unit: base.start[rank][i] for i, op in enumerate(ops) if op.kind.value == "B"}
        expected = {u for u in f_end
                    if u[0] < chunks and b_start[u] - f_end[u] > costs.round_trip(u[0])}
        assert set(plan.offloaded[rank]) == expected == plan.schedule.offloaded_units(rank)
        row = plan.schedule.ranks[rank]
        for i, op in enumerate(row):  # O right after its forward, R right after its O
            if op.kind.value == "O":
                assert row[i - 1].kind.value == "F" and row[i - 1].unit == op.unit
                assert row[i + 1].kind.value == "R" and row[i + 1].unit == op.unit


def test_simple_rule_refuses_bad_input():
    schedule = make_schedule("gis", 2, 2, 2, 2)
    with pytest.raises(ValueError, match="offload-chunks"):
        simple_rule_offload(schedule, CostModel(), chunks=3)
    offloaded = simple_rule_offload(schedule, CostModel(offload_ratio=0.1)).schedule
    with pytest.raises(ValueError, match="without offload"):
        simple_rule_offload(offloaded, CostModel())
