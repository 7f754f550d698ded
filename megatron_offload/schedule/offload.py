"""Selective offload pass: choose units to offload and insert offload/reload ops.

Inputs: a schedule, a cost model (compute times and the round-trip ratio k, one D2H and one H2D
lane per rank or one link per pair of ranks), and the candidates (model chunks < K, an
explicit set of units, or all) and optionally a memory target in units per rank.

Method (pipeoffload.md sections 2-3):
1. Simulate the schedule without offload; a unit's lifespan on its rank is the time from the
   end of its forward to the start of its backward.
2. Skip units whose lifespan cannot cover the round trip (D2H + H2D): offloading them frees
   nothing.
3. Take the rest longest-lifespan first (on a tie, earlier forward first) and keep each unit
   whose copies can still be hidden together with the units already kept: offloads run on the
   D2H lane in forward order right after their forward; reloads run just in time on the H2D
   lane in backward order and must end before their backward starts (no stall). A unit that does not
   fit is skipped and the next one tried, so the pass degrades gracefully to partial offload and
   always returns a schedule. After ``MAX_SKIPS_PER_LINK`` misfits on one link it stops trying
   (bounds the work when the link is far too slow).
4. With a memory target, keep only the shortest prefix of that order that meets it.
5. Each R op goes at the latest op boundary from which its reload still ends in time (the
   earliest point the executor may start it; the reload itself starts just in time).

Copies that abut exactly (a reload starting when the previous one or its offload ends) count
as hidden, as the simulator runs them with no stall; only float rounding (at most _EPS x the
makespan) may overlap. Because every kept unit's copies are hidden, compute times do not change:
offload never lowers makespan (it stays equal under this model) and never raises any rank's peak
(each unit is resident for a subset of the time it was before).
The feasibility check is vectorised with numpy: a FIFO lane's completion times are a running
maximum over prefix sums, so checking a set of n units costs O(n) in C, not Python. The search
(:func:`_greedy`) only runs where misfits can happen: reload intervals that overlap no other
candidate's are kept outright, and the offload lane splits at its idle points into stretches,
of which only those that miss a deadline with every candidate aboard are searched.
The plan keeps the baseline simulation on its schedule, so simulate() of the result only times
the copies (compute is untouched when every copy is hidden; see simulate.py).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .costs import CostModel
from .ir import Op, Schedule
from .kinds import KIND_B, KIND_F, KIND_O, KIND_R, OpKind
from .simulate import Simulation, gc_paused, simulate

MAX_SKIPS_PER_LINK = 64
# relative tolerance: copies that abut exactly (or overlap by float rounding only) count as
# hidden; a gap of _EPS was once required, which refused exact fits the simulator hides with no
# stall (issue 8: the pass then kept fewer units than the simple rule at the same makespan)
_EPS = 1e-9


@dataclass(kw_only=True, slots=True)
class OffloadPlan:
    schedule: Schedule
    """The input schedule with O/R ops inserted."""
    baseline: Simulation
    """Simulation of the schedule without offload (its timing is what the pass planned on)."""
    offloaded: list[list[tuple[int, int]]]
    """Per rank, the (chunk, microbatch) units offloaded, in the order they were picked."""
    short_lived: list[int]
    """Per rank, candidate units skipped because their lifespan is shorter than the round trip."""
    link_bound: list[int]
    """Per rank, candidate units skipped because the link could not hide them as well."""


@dataclass(slots=True)
class _Units:
    """Per-rank arrays over the units of one rank (index = chunk * m + microbatch)."""

    f_step: np.ndarray
    f_start: np.ndarray
    f_end: np.ndarray
    b_step: np.ndarray
    b_start: np.ndarray
    b_end: np.ndarray
    boundary: np.ndarray  # boundary[j] = time the rank reaches step j = end of step j - 1


def _rank_units(baseline: Simulation, rank: int) -> _Units:
    units = baseline.schedule.units_per_rank
    codes = np.asarray(baseline.schedule.program()[rank])
    start, end = np.asarray(baseline.start[rank]), np.asarray(baseline.end[rank])
    steps = np.arange(len(codes))
    kind = codes // units
    is_f, is_b = kind == KIND_F, kind == KIND_B
    f_unit, b_unit = codes[is_f] - KIND_F * units, codes[is_b] - KIND_B * units
    arrays = {}
    for name, mask, unit in (("f", is_f, f_unit), ("b", is_b, b_unit)):
        for field, values in (("step", steps), ("start", start), ("end", end)):
            out = np.empty(units, dtype=values.dtype)
            out[unit] = values[mask]
            arrays[f"{name}_{field}"] = out
    boundary = np.concatenate(([0.0], end))
    return _Units(boundary=boundary, **arrays)


def _fifo_end(ready: np.ndarray, duration: np.ndarray) -> np.ndarray:
    """Completion times of jobs run in this order on one FIFO lane:
    e_i = max(a_i, e_{i-1}) + d_i."""
    total = np.cumsum(duration)
    return total + np.maximum.accumulate(ready - (total - duration))


class _Link:
    """The candidates of the ranks sharing one D2H/H2D lane pair, with the FIFO check."""

    def __init__(self, issue, deadline, d2h, h2d, scale):
        self.issue, self.deadline, self.d2h, self.h2d = issue, deadline, d2h, h2d
        self.by_issue = np.lexsort((np.arange(len(issue)), issue))
        self.by_deadline = np.lexsort((np.arange(len(deadline)), deadline))
        self.slack = -_EPS * max(scale, 1.0)  # negative: every `x < y + slack` test accepts x == y

    def plan(self, chosen: np.ndarray):
        """Offload ends and reload starts of the chosen candidates (boolean mask), or None
        when some reload cannot end before its backward.

        Offloads run FIFO in issue order. Reloads run just in time in backward order (see
        simulate.py): reload i occupies [B_i - h_i, B_i], which works iff it starts after its
        offload ends and after the previous reload on the lane ends (at B_{i-1})."""
        f_order = self.by_issue[chosen[self.by_issue]]
        b_order = self.by_deadline[chosen[self.by_deadline]]
        off_end = np.empty(len(self.issue))
        off_end[f_order] = _fifo_end(self.issue[f_order], self.d2h[f_order])
        reload_start = self.deadline - self.h2d
        starts = reload_start[b_order]
        previous_end = np.concatenate(([-np.inf], self.deadline[b_order][:-1]))
        if np.any(starts < off_end[b_order] + self.slack) or np.any(
            starts < previous_end + self.slack
        ):
            return None
        return off_end, reload_start


def plan_offload(
    schedule: Schedule,
    costs: CostModel,
    *,
    chunks: int | None = None,
    units: Iterable[tuple[int, int, int]] | None = None,
    memory_target: int | Sequence[int] | None = None,
    baseline: Simulation | None = None,
) -> OffloadPlan:
    """Insert offload/reload ops into ``schedule`` (which must have none).

    Candidates: units of model chunks ``< chunks`` (--offload-chunks K), or the explicit
    ``units`` as (rank, chunk, microbatch), or all units. ``memory_target``: stop offloading on
    a rank once its simulated peak is at most this many units (one number for every rank, or
    one per rank; ranks sharing a link aim at the lower of their targets).
    """
    if schedule.has_offload:
        raise ValueError(
            "plan_offload takes a schedule without offload ops; use schedule.without_offload()")
    if chunks is not None and not 0 <= chunks <= schedule.vpp:
        raise ValueError(f"--offload-chunks {chunks} must lie in 0..--vpp ({schedule.vpp})")
    if chunks is not None and units is not None:
        raise ValueError("give candidate chunks or candidate units, not both")
    if memory_target is not None:
        targets = [memory_target] if isinstance(memory_target, int) else list(memory_target)
        if not isinstance(memory_target, int) and len(targets) != schedule.pp:
            raise ValueError(f"memory target has {len(targets)} values for {schedule.pp} ranks; "
                             "give one or one per rank")
        if any(t < 0 for t in targets):
            raise ValueError(f"memory target {memory_target} units must be >= 0")
    with gc_paused():
        plan = _plan_offload(schedule, costs, chunks, units, memory_target, baseline)
        if memory_target is None:
            return plan
        # The pass estimates each link on its own; the simulator (a shared link's lanes serve
        # copies in event order) can peak higher. Aim lower on the ranks that missed, until
        # each meets its target or offloads all it can.
        wanted = (
            [memory_target] * schedule.pp if isinstance(memory_target, int) else list(memory_target)
        )
        aim = list(wanted)
        best = None
        while True:
            peaks = simulate(plan.schedule, costs).peak_units
            missed = [r for r in range(schedule.pp) if peaks[r] > wanted[r] and aim[r] > 0]
            if not missed:
                return plan
            if best is None:
                best = _plan_offload(schedule, costs, chunks, units, None, plan.baseline).offloaded
            missed = [r for r in missed if len(plan.offloaded[r]) < len(best[r])]
            if not missed:
                return plan
            for r in missed:
                aim[r] -= 1
            plan = _plan_offload(schedule, costs, chunks, units, aim, plan.baseline)


def _plan_offload(schedule, costs, chunks, units, memory_target, baseline) -> OffloadPlan:
    baseline = baseline or simulate(schedule, costs)
    pp, m, vpp = schedule.pp, schedule.microbatches, schedule.vpp
    per_rank = schedule.units_per_rank
    chunk_of = np.arange(per_rank) // m
    d2h_of = np.array([costs.offload(c) for c in range(vpp)])[chunk_of]
    h2d_of = np.array([costs.reload(c) for c in range(vpp)])[chunk_of]
    wanted = np.zeros((pp, per_rank), dtype=bool)
    if units is not None:
        for rank, chunk, mb in units:
            wanted[rank, chunk * m + mb] = True
    else:
        wanted[:, chunk_of < (vpp if chunks is None else chunks)] = True

    info = [_rank_units(baseline, r) for r in range(pp)]
    offloaded: list[list[tuple[int, int]]] = [[] for _ in range(pp)]
    short_lived, link_bound = [0] * pp, [0] * pp
    # Per rank: (step each R goes before, its backward's start, unit), as arrays.
    reload_at: list[tuple | None] = [None] * pp
    links = sorted({costs.link_of(r) for r in range(pp)})
    for link in links:
        ranks = [r for r in range(pp) if costs.link_of(r) == link]
        rank_ids, unit_ids = [], []
        for r in ranks:
            lifespan = info[r].b_start - info[r].f_end
            # exceeds the round trip (the link check then allows exact fits)
            fits = lifespan > d2h_of + h2d_of
            short_lived[r] = int(np.count_nonzero(wanted[r] & ~fits))
            chosen_units = np.flatnonzero(wanted[r] & fits)
            rank_ids.append(np.full(len(chosen_units), r))
            unit_ids.append(chosen_units)
        rank_of = np.concatenate(rank_ids)
        unit_of = np.concatenate(unit_ids)
        if len(unit_of) == 0:
            continue
        f_end = (
            np.array([info[r].f_end[u] for r, u in zip(rank_of, unit_of)])
            if len(ranks) > 1
            else info[ranks[0]].f_end[unit_of]
        )
        b_start = (
            np.array([info[r].b_start[u] for r, u in zip(rank_of, unit_of)])
            if len(ranks) > 1
            else info[ranks[0]].b_start[unit_of]
        )
        check = _Link(f_end, b_start, d2h_of[unit_of], h2d_of[unit_of], baseline.makespan)
        # Longest lifespan first; ties: earlier forward, then lower rank (lexsort: last key first).
        priority = np.lexsort((rank_of, f_end, -(b_start - f_end)))
        chosen = _greedy(check, priority)
        if check.plan(chosen) is None:  # pragma: no cover - float rounding at the slack's edge
            chosen = _greedy_by_full_checks(check, priority)
        kept = priority[chosen[priority]]  # in priority order
        if memory_target is not None:
            target = (
                memory_target
                if isinstance(memory_target, int)
                else min(memory_target[r] for r in ranks)
            )
            kept = _meet_target(check, kept, rank_of, unit_of, info, target, d2h_of, h2d_of)
        mask = np.zeros(len(unit_of), dtype=bool)
        mask[kept] = True
        for r in ranks:
            link_bound[r] = int(np.count_nonzero(~mask & (rank_of == r)))
        planned = check.plan(mask)
        _, latest = planned
        kept_rank, kept_unit = rank_of[kept], unit_of[kept]
        for r in ranks:
            here = kept_rank == r
            units_here = kept_unit[here]
            offloaded[r].extend(zip((units_here // m).tolist(), (units_here % m).tolist()))
            # R goes at the latest op boundary at or before its reload start, after the forward.
            steps = np.searchsorted(info[r].boundary, latest[kept[here]], side="right") - 1
            steps = np.maximum(steps, info[r].f_step[units_here] + 1)
            reload_at[r] = (steps, b_start[kept[here]], units_here)
    ops_by_code = _ops_by_code(vpp, m)
    rows = [_insert_copies(schedule, r, offloaded[r], reload_at[r], ops_by_code) for r in range(pp)]
    result = Schedule(tuple(ops for ops, _ in rows), vpp, m, schedule.kind, schedule.group_size)
    result.with_program([codes for _, codes in rows])
    if baseline.schedule is schedule and baseline.costs == costs:
        # lets simulate() reuse the compute times
        object.__setattr__(result, "_compute_timing", baseline)
    return OffloadPlan(schedule=result, baseline=baseline, offloaded=offloaded,
                       short_lived=short_lived, link_bound=link_bound)


def _greedy_by_full_checks(check: _Link, priority: np.ndarray) -> np.ndarray:
    """The first version of :func:`_greedy` (same result, every check over all candidates);
    kept as the fallback should rounding at the slack's edge ever make the two differ.

    Fast path: everything fits (one check). Otherwise first the reload lane, whose constraints
    are local (a reload needs the lane from B_i - h_i to B_i, after its earliest offload end),
    greedily with a sorted list; then the offload lane, whose FIFO delays propagate, by binary
    search on the longest fitting run, O(log n) checks per misfit."""
    everything = np.ones(len(priority), dtype=bool)
    if check.plan(everything) is not None:
        return everything
    starts = check.deadline - check.h2d
    floor = check.issue + check.d2h + check.slack
    kept_ends: list[float] = []  # deadlines (= reload ends) of kept units, sorted
    kept_starts: list[float] = []  # their reload starts, same order
    order = []
    for i in priority.tolist():
        begin, end = starts[i], check.deadline[i]
        if begin < floor[i]:
            continue
        at = bisect.bisect_right(kept_ends, end)
        if at > 0 and kept_ends[at - 1] > begin - check.slack:
            continue
        if at < len(kept_starts) and kept_starts[at] < end + check.slack:
            continue
        kept_ends.insert(at, end)
        kept_starts.insert(at, begin)
        order.append(i)
    priority = np.asarray(order, dtype=np.int64)
    chosen = np.zeros(len(check.issue), dtype=bool)
    position, skips = 0, 0
    while position < len(priority) and skips <= MAX_SKIPS_PER_LINK:
        trial = chosen.copy()
        trial[priority[position:]] = True
        if check.plan(trial) is not None:
            return trial
        # Gallop (runs of 1, 2, 4, ...) then bisect: misfits cluster (a congested stretch of the
        # lane), so the next one is usually near and costs O(log distance) checks.
        low, high, step = 0, len(priority) - position, 1  # a run of `low` fits, `high` does not
        while low + step < high:
            trial = chosen.copy()
            trial[priority[position : position + low + step]] = True
            if check.plan(trial) is None:
                high = low + step
                break
            low, step = low + step, step * 2
        while high - low > 1:
            middle = (low + high) // 2
            trial = chosen.copy()
            trial[priority[position : position + middle]] = True
            if check.plan(trial) is None:
                high = middle
            else:
                low = middle
        chosen[priority[position : position + low]] = True
        position += low + 1  # priority[position + low] does not fit: skip it
        skips += 1
    return chosen


def _greedy(check: _Link, priority: np.ndarray) -> np.ndarray:
    """Keep candidates in priority order while they fit; stop after ``MAX_SKIPS_PER_LINK + 1``
    misfits. Same result as :func:`_greedy_by_full_checks`, which checks every candidate set
    on the whole lane; this one confines the work to the few places where misfits can occur.

    Reload lane: a kept reload must not overlap another kept one (intervals [B_i - h_i, B_i]),
    so candidates whose interval overlaps no other candidate's (2 x slack apart) are kept
    outright and the sequential sorted-list greedy runs over the overlapping ones only (with
    the same neighbour checks: an interval never conflicts with one of another overlap group).

    Offload lane (FIFO): run it with every remaining candidate. Where the lane falls idle
    (a job ready no earlier than the previous one ends) it is idle for every subset as well, so
    the lane splits into independent stretches; a stretch whose deadlines hold with every
    candidate holds for any subset: "safe". Misfits can only occur in the other stretches, so
    the search for them (gallop + bisect, as before) checks those stretches' jobs alone, run as
    one FIFO (they stay independent when concatenated). Safe candidates are then kept up to the
    point where the search stopped."""
    n = len(check.issue)
    everything = np.ones(n, dtype=bool)
    if check.plan(everything) is not None:
        return everything
    slack = check.slack
    starts = check.deadline - check.h2d
    floor = check.issue + check.d2h + slack
    candidates = priority[~(starts[priority] < floor[priority])]
    # Overlap groups of the reload intervals, extended by 2 x |slack| (grouping too much is safe).
    by_start = candidates[np.argsort(starts[candidates], kind="stable")]
    reach = np.maximum.accumulate(check.deadline[by_start] + 2 * abs(slack))
    opens = np.ones(len(by_start), dtype=bool)
    opens[1:] = starts[by_start][1:] >= reach[:-1]
    group = np.cumsum(opens) - 1
    alone = np.zeros(n, dtype=bool)
    alone[by_start] = np.bincount(group)[group] == 1
    keep = alone.copy()
    kept_ends: list[float] = []
    kept_starts: list[float] = []
    crowded = candidates[~alone[candidates]]
    for i, begin, end in zip(crowded.tolist(), starts[crowded].tolist(),
                             check.deadline[crowded].tolist()):
        at = bisect.bisect_right(kept_ends, end)
        if at > 0 and kept_ends[at - 1] > begin - slack:
            continue
        if at < len(kept_starts) and kept_starts[at] < end + slack:
            continue
        kept_ends.insert(at, end)
        kept_starts.insert(at, begin)
        keep[i] = True
    order = candidates[keep[candidates]]  # what the offload lane gets, in priority order
    # The offload lane with all of them: idle points, stretches, unsafe stretches.
    jobs = check.by_issue[keep[check.by_issue]]
    ready, duration, limit = check.issue[jobs], check.d2h[jobs], starts[jobs]
    end = _fifo_end(ready, duration)
    opens = np.ones(len(jobs), dtype=bool)
    opens[1:] = ready[1:] >= end[:-1]
    stretch = np.cumsum(opens) - 1
    unsafe = np.bincount(stretch, weights=limit < end + slack,
                         minlength=stretch[-1] + 1 if len(jobs) else 0) > 0
    risky = unsafe[stretch]
    place = np.full(n, len(order), dtype=np.int64)  # index in `order` (priority) per candidate
    place[order] = np.arange(len(order))
    # The search over the risky jobs: sequence = risky candidates in priority order.
    local = jobs[risky]  # candidate ids of the risky jobs, in issue order
    sequence = np.sort(place[local])  # their priority indices, ascending
    rank_in_sequence = np.searchsorted(sequence, place[local])
    ready, duration, limit = ready[risky], duration[risky], limit[risky]
    skipped = np.zeros(len(local), dtype=bool)

    def fits(count: int) -> bool:
        """Whether the risky jobs before position ``count`` of the sequence, less the skipped
        ones, all meet their reloads."""
        active = np.flatnonzero((rank_in_sequence < count) & ~skipped)
        if len(active) == 0:
            return True
        finish = _fifo_end(ready[active], duration[active])
        return not np.any(limit[active] < finish + slack)

    position, skips, stop = 0, 0, len(order)
    where = np.empty(len(local), dtype=np.int64)  # sequence position -> local job
    where[rank_in_sequence] = np.arange(len(local))
    while position < len(sequence) and skips <= MAX_SKIPS_PER_LINK:
        if fits(len(sequence)):
            break
        low, high, step = 0, len(sequence) - position, 1  # a run of `low` fits, `high` does not
        while low + step < high:
            if not fits(position + low + step):
                high = low + step
                break
            low, step = low + step, step * 2
        while high - low > 1:
            middle = (low + high) // 2
            if fits(position + middle):
                low = middle
            else:
                high = middle
        skipped[where[position + low]] = True
        position += low + 1
        skips += 1
        if skips > MAX_SKIPS_PER_LINK:
            stop = int(sequence[position - 1])  # the search ends at this misfit
    chosen = np.zeros(n, dtype=bool)
    chosen[order[:stop]] = True
    chosen[local[skipped]] = False
    return chosen


def _meet_target(check, kept, rank_of, unit_of, info, target, d2h_of, h2d_of) -> np.ndarray:
    """Shortest prefix of ``kept`` after which every rank of the link peaks at <= target
    (all of ``kept`` when even that does not reach it)."""

    def worst_peak(count: int) -> int:
        mask = np.zeros(len(unit_of), dtype=bool)
        mask[kept[:count]] = True
        off_end, latest = check.plan(mask)
        worst = 0
        for r in set(rank_of.tolist()):
            here = mask & (rank_of == r)
            u = unit_of[here]
            reserve = np.concatenate((info[r].f_start, latest[here]))
            release = np.concatenate((info[r].b_end[np.setdiff1d(np.arange(len(info[r].b_end)), u)],
                                      off_end[here], info[r].b_end[u]))
            # Offloaded units leave at their offload end and come back for [reload, B end].
            release_sorted = np.sort(release)
            reserve_sorted = np.sort(reserve)
            level = np.arange(1, len(reserve_sorted) + 1) - np.searchsorted(
                release_sorted, reserve_sorted, side="right"
            )
            worst = max(worst, int(level.max(initial=0)))
        return worst

    low, high = 0, len(kept)
    if worst_peak(high) > target:
        return kept
    while low < high:
        middle = (low + high) // 2
        if worst_peak(middle) <= target:
            high = middle
        else:
            low = middle + 1
    return kept[:low]


def _ops_by_code(vpp: int, m: int) -> list[Op]:
    """One Op object per op code (every kind of every unit), shared by all ranks."""
    return [Op(kind, chunk, mb) for kind in OpKind for chunk in range(vpp) for mb in range(m)]


def _insert_copies(schedule: Schedule, rank: int, offloaded: list[tuple[int, int]],
                   reload_at: tuple | None,
                   ops_by_code: list[Op]) -> tuple[tuple[Op, ...], list[int]]:
    """The rank's ops and codes with O right after each chosen forward and the R ops before
    their steps, in backward order (keeps the H2D lane FIFO in the order reloads are needed).

    Done as one stable sort of op codes (a half-million-op schedule in milliseconds): step j
    sorts at 3j + 1, its reloads at 3j (by deadline), the offload after a forward at 3j + 2."""
    m, units = schedule.microbatches, schedule.units_per_rank
    codes = np.asarray(schedule.program()[rank], dtype=np.int64)
    keys = [3 * np.arange(len(codes)) + 1]
    secondary = [np.zeros(len(codes))]
    parts = [codes]
    chosen = np.zeros(units, dtype=bool)
    chosen[[c * m + mb for c, mb in offloaded]] = True
    forward_steps = np.flatnonzero((codes // units == KIND_F) & chosen[codes % units])
    keys.append(3 * forward_steps + 2)
    secondary.append(np.zeros(len(forward_steps)))
    parts.append(codes[forward_steps] + (KIND_O - KIND_F) * units)
    if reload_at is not None:
        steps, deadlines, reload_units = reload_at
        keys.append(3 * steps.astype(np.int64))
        secondary.append(deadlines.astype(float))
        parts.append(reload_units.astype(np.int64) + KIND_R * units)
    order = np.lexsort((np.concatenate(secondary), np.concatenate(keys)))
    new_codes = np.concatenate(parts)[order].tolist()
    return tuple(map(ops_by_code.__getitem__, new_codes)), new_codes


def simple_rule_offload(schedule: Schedule, costs: CostModel, *, chunks: int | None = None,
                        baseline: Simulation | None = None) -> OffloadPlan:
    """The simple rule the selective pass must never lose to (issue 8): offload every unit of a
    model chunk ``< chunks`` (all chunks when None) whose lifespan without offload (end of its
    forward to start of its backward, in ``simulate(schedule, costs)``) exceeds two transfer
    times (D2H + H2D of the unit: the round trip), and reload it just in time.

    O goes right after the unit's forward (the D2H lane runs the offloads FIFO in that order).
    R goes right after its O, the earliest issue point: the simulator then starts the reload as
    late as lets it end when the backward could otherwise start, on the H2D lane in backward
    order (just in time), never before the offload is done or the lane is free. Nothing checks
    that the copies fit: a copy the link cannot hide delays its backward, as the simulator
    times it (``simulate(plan.schedule, costs)``), and the delay propagates down the pipeline.
    ``link_bound`` is therefore all zeros: the rule never skips a unit for the link.
    """
    if schedule.has_offload:
        raise ValueError("simple_rule_offload takes a schedule without offload ops; use "
                         "schedule.without_offload()")
    if chunks is not None and not 0 <= chunks <= schedule.vpp:
        raise ValueError(f"--offload-chunks {chunks} must lie in 0..--vpp ({schedule.vpp})")
    with gc_paused():
        baseline = baseline or simulate(schedule, costs)
        pp, m, vpp = schedule.pp, schedule.microbatches, schedule.vpp
        per_rank = schedule.units_per_rank
        chunk_of = np.arange(per_rank) // m
        round_trip = np.array([costs.offload(c) + costs.reload(c) for c in range(vpp)])[chunk_of]
        wanted = chunk_of < (vpp if chunks is None else chunks)
        ops_by_code = _ops_by_code(vpp, m)
        offloaded: list[list[tuple[int, int]]] = []
        short_lived: list[int] = []
        rows = []
        for r in range(pp):
            info = _rank_units(baseline, r)
            long_lived = info.b_start - info.f_end > round_trip
            short_lived.append(int(np.count_nonzero(wanted & ~long_lived)))
            units_here = np.flatnonzero(wanted & long_lived)
            offloaded.append(list(zip((units_here // m).tolist(), (units_here % m).tolist())))
            reload_at = (info.f_step[units_here] + 1, info.b_start[units_here], units_here)
            rows.append(_insert_copies(schedule, r, offloaded[r], reload_at, ops_by_code))
        result = Schedule(tuple(ops for ops, _ in rows), vpp, m, schedule.kind, schedule.group_size)
        result.with_program([codes for _, codes in rows])
    return OffloadPlan(schedule=result, baseline=baseline, offloaded=offloaded,
                       short_lived=short_lived, link_bound=[0] * pp)
