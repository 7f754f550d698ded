"""The fast paths give exactly what the straightforward versions give.

- offload pass: plan_offload against the pass as first written (_offload_reference.py, the
  oracle), on a sample of small shapes, costs, candidates and memory targets, also with a tiny
  MAX_SKIPS_PER_LINK so that the search stops early (the cap is hard to reach on small shapes);
- simulator: the per-rank-lane engine and the timing reuse after the offload pass against the
  general engine (every start and end time, bit for bit), on the offload pass's schedules and
  on schedules with copies forced onto random units, where reloads wait for their offload;
- dry run: find_deadlock against the first version (_validate_reference.py), stuck or not;
- benchmark: its code path runs on a small shape and writes its JSON.
"""
import dataclasses
import importlib.util
import json
import random
from pathlib import Path

import pytest

from megatron_offload.schedule import offload
from megatron_offload.schedule import simulate as sim
from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.costs import CostModel
from megatron_offload.schedule.ir import O, R, Schedule
from megatron_offload.schedule.kinds import OpKind
from megatron_offload.schedule.megatron import group_table, warmup_then_alternate
from megatron_offload.schedule.validate import find_deadlock, validate_schedule

import _offload_reference as reference
import _validate_reference


def _cases(seed: int, count: int):
    rng = random.Random(seed)
    made = 0
    while made < count:
        kind = rng.choice(["gis", "gis", "interleaved"])
        pp, vpp, m = rng.randint(1, 10), rng.randint(1, 4), rng.randint(1, 32)
        g = rng.randint(1, m)
        costs = CostModel(
            forward_time=tuple(rng.choice([0.3, 0.5, 1.0, 1.5]) for _ in range(vpp)),
            backward_time=tuple(rng.choice([0.7, 1.0, 2.0, 2.5]) for _ in range(vpp)),
            p2p_latency=rng.choice([0.0, 0.1, 0.37]),
            offload_ratio=rng.choice([0.3, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0]),
            offload_share=rng.choice([0.5, 0.5, 0.3, 0.7]),
            shared_link=rng.random() < 0.3,
        )
        try:
            schedule = make_schedule(kind, pp, vpp, m, g)
        except ValueError:
            continue  # a shape Megatron refuses
        options = rng.choice([{}, {}, {"chunks": rng.randint(0, vpp)},
                              {"memory_target": rng.randint(0, 6)}])
        made += 1
        yield schedule, costs, options


def _same_plan(a, b) -> None:
    assert a.schedule.ranks == b.schedule.ranks
    assert a.offloaded == b.offloaded
    assert a.link_bound == b.link_bound and a.short_lived == b.short_lived


@pytest.mark.parametrize("skips", [None, 0, 3])
def test_offload_pass_matches_the_first_version(monkeypatch, skips):
    if skips is not None:
        monkeypatch.setattr(offload, "MAX_SKIPS_PER_LINK", skips)
        monkeypatch.setattr(reference, "MAX_SKIPS_PER_LINK", skips)
    for schedule, costs, options in _cases(seed=0 if skips is None else 1 + skips, count=120):
        _same_plan(offload.plan_offload(schedule, costs, **options),
                   reference.plan_offload(schedule, costs, **options))


@pytest.mark.parametrize("kind,g", [("gis", 8), ("gis", 4), ("interleaved", 8)])
@pytest.mark.parametrize("k", [0.5, 1.0, 1.5, 3.0])
def test_offload_pass_matches_the_first_version_on_congested_links(kind, g, k):
    # Long warm-ups: the offload lane congests and the search skips many units on each link.
    schedule = make_schedule(kind, 8, 4, 64, g)
    costs = CostModel(forward_time=1.0, backward_time=2.0, offload_ratio=k)
    plan = offload.plan_offload(schedule, costs)
    _same_plan(plan, reference.plan_offload(schedule, costs))
    if k >= 1.5:
        assert sum(plan.link_bound) > 0


def _same_simulation(a, b) -> None:
    assert a.start == b.start and a.end == b.end
    assert a.makespan == b.makespan and a.busy == b.busy
    assert a.peak_units == b.peak_units and a.offloaded_units == b.offloaded_units
    for rank in range(a.pp):
        assert a.memory_curve(rank) == b.memory_curve(rank)


def test_simulator_engines_agree():
    hinted = 0
    for schedule, costs, options in _cases(seed=7, count=120):
        private = dataclasses.replace(costs, shared_link=False)
        plan = offload.plan_offload(schedule, private, **options)
        for case in (schedule, plan.schedule):
            _same_simulation(sim._run_private(case, private), sim._run_general(case, private))
        fast = sim._run_hinted(plan.schedule, private, plan.baseline)
        hinted += fast is not None
        if fast is not None:
            _same_simulation(fast, sim._run_general(plan.schedule, private))
        result = sim.simulate(plan.schedule, private)  # takes the hinted path when it can
        _same_simulation(result, sim._run_general(plan.schedule, private))
        assert result.no_offload_makespan == sim._run_general(schedule, private).makespan
    assert hinted > 60


def _with_copies(schedule: Schedule, copies: list[dict]) -> Schedule:
    """``schedule`` with O and R forced onto the units of ``copies[rank]`` (unit -> early),
    whatever their lifespan: O right after the unit's forward, R right after its O (early: the
    earliest issue point) or right before its backward. Unlike the offload pass's output, a
    reload may then wait for its own offload (a short-lived unit, or one queued behind others
    on the D2H lane). Still a valid schedule: copies send nothing."""
    rows = []
    for ops, units in zip(schedule.ranks, copies):
        row = []
        for op in ops:
            if op.kind is OpKind.BACKWARD and units.get(op.unit) is False:
                row.append(R(*op.unit))
            row.append(op)
            if op.kind is OpKind.FORWARD and op.unit in units:
                row.append(O(*op.unit))
                if units[op.unit]:
                    row.append(R(*op.unit))
        rows.append(row)
    return validate_schedule(Schedule(rows, schedule.vpp, schedule.microbatches))


def _random_copies(schedule: Schedule, rng: random.Random, share: float,
                   early_share: float) -> list[dict]:
    """A share ``share`` of each rank's units, a share ``early_share`` of them reloaded early."""
    return [{op.unit: rng.random() < early_share for op in ops
             if op.kind is OpKind.FORWARD and rng.random() < share} for ops in schedule.ranks]


def _reloads_waiting_for_their_offload(result) -> int:
    """Reloads that start when their unit's offload ends, after they were issued (the end of
    the compute op before the R): the "no earlier than its offload" bound decided their start."""
    waiting = 0
    for ops, start, end in zip(result.schedule.ranks, result.start, result.end):
        offload_end, clock = {}, 0.0
        for i, op in enumerate(ops):
            if op.kind is OpKind.OFFLOAD:
                offload_end[op.unit] = end[i]
            elif op.kind is OpKind.RELOAD:
                waiting += start[i] == offload_end[op.unit] > clock
            else:
                clock = end[i]
    return waiting


def _compute_times(result) -> list:
    return [[(s, e) for op, s, e in zip(ops, start, end) if op.kind.compute]
            for ops, start, end in zip(result.schedule.ranks, result.start, result.end)]


def _engines_agree(forced: Schedule, costs: CostModel, base) -> tuple:
    """Every engine on ``forced`` gives the general engine's result; the hinted one (timing the
    copies against ``base``, the compute-only simulation) declines exactly when some reload
    delays its backward. Returns the general result and whether the hinted engine timed it."""
    general = sim._run_general(forced, costs)
    _same_simulation(sim._run_private(forced, costs), general)
    fast = sim._run_hinted(forced, costs, base)
    assert (fast is not None) == (_compute_times(general) == _compute_times(base))
    if fast is not None:
        _same_simulation(fast, general)
    object.__setattr__(forced, "_compute_timing", base)  # as the offload pass leaves it
    _same_simulation(sim.simulate(forced, costs), general)
    return general, fast is not None


def test_simulator_engines_agree_when_reloads_wait_for_their_offload():
    # Copies forced onto random units, mostly over a slow link: many reloads can start only
    # when their own offload ends, a bound the offload pass's schedules never reach. Fast links
    # with early reloads leave some schedules whose reloads are all in time (the hinted engine).
    rng = random.Random(11)
    waiting = hinted = late = 0
    for schedule, costs, _ in _cases(seed=13, count=100):
        if rng.random() < 0.4:  # fast link, few units, reloads issued early
            ratio, share, early_share = rng.choice([0.02, 0.1, 0.3]), rng.choice([0.1, 0.2]), 1.0
        else:  # slow link
            ratio, share, early_share = rng.choice([1.0, 2.0, 3.0, 5.0, 8.0]), rng.choice(
                [0.3, 0.6, 1.0]), 0.3
        costs = dataclasses.replace(costs, shared_link=False, offload_ratio=ratio)
        forced = _with_copies(schedule, _random_copies(schedule, rng, share, early_share))
        general, timed = _engines_agree(forced, costs, sim._run_general(schedule, costs))
        waiting += _reloads_waiting_for_their_offload(general)
        hinted += timed and forced.has_offload
        late += not timed
    assert waiting > 300 and hinted >= 5 and late > 40, (waiting, hinted, late)


def test_a_reload_that_waits_for_its_offload_delays_its_backward_in_every_engine():
    # One unit offloaded and reloaded early, the link set from its lifespan L (end of its
    # forward to start of its backward) so that its reload (H2D < L) could end in time, but
    # the round trip (D2H + H2D > L) cannot: only the "reload after its offload" bound makes
    # the backward wait. The hinted engine must decline; all must agree on the delay.
    rng = random.Random(17)
    delayed = 0
    for schedule, costs, _ in _cases(seed=19, count=40):
        costs = dataclasses.replace(costs, shared_link=False)
        base = sim._run_general(schedule, costs)
        lives = []
        for rank, ops in enumerate(schedule.ranks):
            forward = {op.unit: i for i, op in enumerate(ops) if op.kind is OpKind.FORWARD}
            lives += [(rank, op.unit, base.start[rank][i] - base.end[rank][forward[op.unit]])
                      for i, op in enumerate(ops) if op.kind is OpKind.BACKWARD]
        lives = [life for life in lives if life[2] > 0]
        if not lives:
            continue
        rank, unit, life = rng.choice(lives)
        chunk = unit[0]
        round_trip = life / (1 - costs.offload_share / 2)  # H2D < life < D2H + H2D
        costs = dataclasses.replace(
            costs, offload_ratio=round_trip / (costs.forward(chunk) + costs.backward(chunk)))
        copies = [{} for _ in schedule.ranks]
        copies[rank][unit] = True
        base = dataclasses.replace(base, costs=costs)  # no copies: times independent of the link
        general, timed = _engines_agree(_with_copies(schedule, copies), costs, base)
        assert not timed  # its backward waits: compute times differ from base
        delayed += 1
    assert delayed > 30


def test_simulate_ignores_the_timing_hint_for_other_costs():
    schedule = make_schedule("gis", 4, 2, 8, 4)
    planned = CostModel(offload_ratio=1.0)
    plan = offload.plan_offload(schedule, planned)
    other = CostModel(offload_ratio=1.0, forward_time=1.5)
    _same_simulation(sim.simulate(plan.schedule, other), sim._run_general(plan.schedule, other))


def test_dry_run_matches_the_first_version():
    rng = random.Random(3)
    stuck = 0
    for _ in range(600):
        pp, vpp, m = rng.randint(1, 8), rng.randint(1, 4), rng.randint(1, 16)
        table = group_table(m, vpp, rng.randint(1, m))
        schedule = Schedule(tuple(tuple(warmup_then_alternate(table, vpp, rng.randint(0, vpp * m)))
                                  for _ in range(pp)), vpp, m)
        expected = _validate_reference.find_deadlock(schedule)
        assert find_deadlock(schedule) == expected
        stuck += bool(expected)
    assert 100 < stuck < 600
    plan = offload.plan_offload(make_schedule("gis", 4, 2, 8, 2), CostModel(offload_ratio=1.0))
    assert find_deadlock(plan.schedule) == _validate_reference.find_deadlock(plan.schedule) == {}


def test_benchmark_code_path_runs_on_a_small_shape(tmp_path, capsys):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "schedule_speed.py"
    spec = importlib.util.spec_from_file_location("schedule_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.json"
    bench.main(["--pp", "4", "--vpp", "2", "--microbatches", "8", "--repeat", "1", "--json",
                str(out)])
    rows = json.loads(out.read_text())
    assert [(r["schedule"], r["offload_ratio"]) for r in rows] == [
        (s, k) for s in bench.SCHEDULES for k in bench.RATIOS
    ]
    assert {r["group_size"] for r in rows if r["schedule"] == "gis-half"} == {2}
    assert all(r["total_s"] >= r["offload_pass_s"] >= 0
               and r["makespan"] == r["no_offload_makespan"]
               for r in rows if r["offload_ratio"] <= 1.0)
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 + len(rows) and "gis-half" in printed
