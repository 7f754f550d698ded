"""Event simulation of a schedule: per-op times, makespan, bubbles, memory in units.

Execution model (the executor's, see validate.py): each rank runs its list in order; a compute
op starts when the rank is free and its input has arrived (producer end + p2p latency); an
offload starts when issued (right after its forward) and its D2H lane is free; a backward of
an offloaded unit also waits for its reload. Reloads start just in time: as late as lets them
end when their backward could otherwise start, but never before the R op is reached (its place
in the list is the earliest issue point), before the unit's offload is done, or before the
H2D lane is free; reloads run in backward order. (PipeOffload's model: the executor triggers a
reload from inside the preceding compute, at a layer boundary, rather than at an op boundary.
Issuing at the R op instead costs up to about one unit of extra peak.) Lanes are FIFO (CUDA
stream order); a lane shared by two ranks (CostModel.shared_link) serves each copy in the
earliest gap after it is ready, an approximation of two streams contending for one link.

Memory convention, in units (one chunk's activations for one microbatch): a unit becomes
resident when its forward starts and is released when its backward ends; an offloaded unit
leaves when its offload copy completes and is reserved again when its reload starts. At equal
times releases count before reservations. With this 1F1B rank r peaks at min(p - r, m).

What an op does here is its kind's row of the kinds table (:mod:`.kinds`): compute or a copy on
a lane, where its p2p input comes from, whether it waits for its unit's reload, whether it
reserves or releases its unit. Durations come from ``CostModel.time``.

Engines (identical results, tests/schedule/test_fast_paths.py): :func:`_run_general` (any
cost model; a shared link needs it, since its lanes serve copies in event order);
:func:`_run_private` (one lane pair per rank: precomputed dependency slots, blocked ranks only
woken once their input exists); :func:`_run_hinted` (a schedule from the offload pass, which
carries the simulation of its compute ops: if every reload ends in time the compute times are
those, and only the copies are timed, else the full engine runs).
"""
from __future__ import annotations

import bisect
import gc
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .costs import CostModel
from .ir import Schedule
from .kinds import FIRST_COPY_CODE, KIND_B, KIND_COUNT, KIND_F, KIND_O, KIND_R, Lane, OpKind
from .validate import input_slots, slot_width, validate_schedule

# What the engines do with an op, by kind code, from the kinds table (:mod:`.kinds`): a compute
# op (waiting for its unit's reload when the kind needs its activations resident), or a copy on
# the D2H or the H2D lane. Memory: a kind that allocates reserves its unit at the op's start,
# one that frees releases it at the op's end.
_COMPUTE, _COMPUTE_RESIDENT, _D2H, _H2D = 0, 1, 2, 3
_ROLE = [(_COMPUTE_RESIDENT if kind.needs_resident else _COMPUTE) if kind.compute
         else (_D2H if kind.lane is Lane.D2H else _H2D) for kind in OpKind]
_ROLES = np.array(_ROLE, dtype=np.int64)
_SOURCE = [0 if kind.sends is None else -kind.sends.step for kind in OpKind]
"""Per kind code: where a compute op's p2p input comes from: -1 the previous virtual stage,
+1 the next one, 0 none."""
_ALLOCATES = np.array([kind.allocates for kind in OpKind])
_FREES = np.array([kind.frees for kind in OpKind])
_IS_D2H = np.array([kind.lane is Lane.D2H for kind in OpKind])
_NEVER = -1.0
"""An end time not reached yet (times are >= 0)."""
_HINTABLE = np.zeros(KIND_COUNT, dtype=bool)
_HINTABLE[[KIND_F, KIND_B, KIND_O, KIND_R]] = True
"""The kinds of the offload pass's output, all :func:`_run_hinted` knows how to time."""


@dataclass(kw_only=True, slots=True)
class Simulation:
    schedule: Schedule
    costs: CostModel
    start: list[list[float]]
    """start[r][i]: when step i of rank r starts (for O/R: when the copy starts)."""
    end: list[list[float]]
    makespan: float
    busy: list[float]
    """Compute time per rank (sum of F and B durations)."""
    peak_units: list[int]
    offloaded_units: int
    no_offload_makespan: float
    """Makespan of the same compute order without offload (equal to makespan when none)."""
    # per rank, sorted (list or numpy array)
    _reserve: list = field(repr=False, default_factory=list)
    _release: list = field(repr=False, default_factory=list)

    @property
    def pp(self) -> int:
        return self.schedule.pp

    @property
    def bubble(self) -> list[float]:
        """Idle share of the makespan, per rank."""
        return [1.0 - b / self.makespan for b in self.busy]

    @property
    def bubble_ratio(self) -> float:
        return 1.0 - sum(self.busy) / (self.pp * self.makespan)

    @property
    def total_units(self) -> int:
        return self.pp * self.schedule.units_per_rank

    @property
    def offloaded_fraction(self) -> float:
        return self.offloaded_units / self.total_units

    @property
    def slowdown(self) -> float:
        """makespan / makespan without offload - 1 (0.0 = offload is free)."""
        return self.makespan / self.no_offload_makespan - 1.0

    def memory_curve(self, rank: int) -> list[tuple[float, int]]:
        """(time, resident units from then on), one point per change, starting at (0, 0)."""
        curve = [(0.0, 0)]
        level = 0
        reserve, release = self._reserve[rank], self._release[rank]
        if isinstance(reserve, np.ndarray):
            reserve, release = reserve.tolist(), release.tolist()
        for time, delta in _events(reserve, release):
            level += delta
            if curve[-1][0] == time:
                curve[-1] = (time, level)
            else:
                curve.append((time, level))
        return curve


def _events(reserve: list[float], release: list[float]):
    """Merge sorted reservation and release times; releases first at equal times."""
    i = j = 0
    while i < len(reserve) or j < len(release):
        if j < len(release) and (i == len(reserve) or release[j] <= reserve[i]):
            yield release[j], -1
            j += 1
        else:
            yield reserve[i], 1
            i += 1


def _peak(reserve: list[float], release: list[float]) -> int:
    # After the i-th reservation (0-based) at time t, resident = i + 1 - releases at or before t.
    peak, j, count = 0, 0, len(release)
    for i, time in enumerate(reserve):
        while j < count and release[j] <= time:
            j += 1
        if i + 1 - j > peak:
            peak = i + 1 - j
    return peak


class _FifoLane:
    """One link lane whose copies run in issue order (one CUDA stream)."""

    __slots__ = ("free",)

    def __init__(self) -> None:
        self.free = 0.0

    def place(self, ready: float, duration: float) -> float:
        begin = ready if ready > self.free else self.free
        self.free = begin + duration
        return begin


class _SharedLane:
    """Busy intervals of one link lane; a copy takes the earliest gap at or after it is ready."""

    __slots__ = ("starts", "ends")

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def place(self, ready: float, duration: float) -> float:
        i = bisect.bisect_right(self.ends, ready)
        begin = ready
        while i < len(self.starts):
            if begin + duration <= self.starts[i]:
                break
            begin = max(begin, self.ends[i])
            i += 1
        self.starts.insert(i, begin)
        self.ends.insert(i, begin + duration)
        return begin


@contextmanager
def gc_paused():
    """Pause the cyclic garbage collector for a block that allocates many small objects while
    large op tuples are alive (each full collection would walk all of them); the block creates
    no reference cycles worth collecting early. Restores the previous state."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def simulate(schedule: Schedule, costs: CostModel | None = None, *,
             no_offload_makespan: float | None = None) -> Simulation:
    """Simulate ``schedule``; raises ScheduleError if it deadlocks (validate first for the grid).

    With offload ops, the same order is also simulated without them for ``slowdown``, unless
    ``no_offload_makespan`` is given (the offload pass has it: ``plan.baseline.makespan``)."""
    costs = costs or CostModel()
    costs.check_chunks(schedule.vpp)
    with gc_paused():
        return _simulate(schedule, costs, no_offload_makespan)


def _simulate(schedule: Schedule, costs: CostModel,
              no_offload_makespan: float | None) -> Simulation:
    private = not (costs.shared_link and schedule.pp > 1)
    run = _run_private if private else _run_general
    hint = schedule._compute_timing
    result = None
    if private and hint is not None and hint.costs == costs:
        result = _run_hinted(schedule, costs, hint)
        if result is not None and no_offload_makespan is None:
            no_offload_makespan = hint.makespan
    if result is None:
        result = run(schedule, costs)
    if no_offload_makespan is not None:
        result.no_offload_makespan = no_offload_makespan
    elif result.offloaded_units:
        result.no_offload_makespan = run(schedule.without_offload(), costs).makespan
    return result


def _run_general(schedule: Schedule, costs: CostModel) -> Simulation:
    """The engine for any cost model: each rank runs until an op's p2p input is missing; a rank
    that advanced wakes its neighbours (and the first and last rank, across the wrap)."""
    ranks = _general_ranks(schedule, costs)
    pp, last = schedule.pp, schedule.pp - 1
    pending = list(range(pp))
    while pending:
        rank = pending.pop()
        if ranks[rank].advance():
            for other in {rank - 1, rank + 1, 0, last}:
                if (
                    0 <= other < pp
                    and other != rank
                    and ranks[other].position < ranks[other].count
                    and other not in pending
                ):
                    pending.append(other)
    if any(run.position < run.count for run in ranks):
        validate_schedule(schedule)  # raises with the grid
        raise AssertionError("simulation stalled on a schedule that validates")  # pragma: no cover
    return _general_result(schedule, costs, ranks)


def _general_ranks(schedule: Schedule, costs: CostModel) -> list[_GeneralRank]:
    """The ranks of :func:`_run_general`, each with the shared tables by op code (duration, kind
    code), its neighbours' end times (its inputs) and its link lanes (ranks 2i and 2i+1 share
    theirs with ``costs.shared_link``)."""
    pp, vpp, m = schedule.pp, schedule.vpp, schedule.microbatches
    units = vpp * m
    duration = [costs.time(kind, unit // m) for kind in OpKind for unit in range(units)]
    kind_of = [code // units for code in range(KIND_COUNT * units)]
    latency = costs.p2p_latency if pp > 1 else 0.0
    lanes = [costs.link_of(rank) for rank in range(pp)]
    lane_type = _SharedLane if costs.shared_link and pp > 1 else _FifoLane
    d2h = [lane_type() for _ in range(max(lanes) + 1)]
    h2d = [lane_type() for _ in range(max(lanes) + 1)]
    ranks = [_GeneralRank(rank, pp, m, units, latency, duration, kind_of, codes,
                          d2h[lanes[rank]], h2d[lanes[rank]])
             for rank, codes in enumerate(schedule.program())]
    for rank, run in enumerate(ranks):
        run.before = ranks[rank - 1].done  # rank 0: the last rank's
        run.after = ranks[(rank + 1) % pp].done
    return ranks


class _GeneralRank:
    """One rank of :func:`_run_general`: its program (op codes), where it stands, its clock (end
    of its last compute op), busy time and start/end times so far, the end time of each of its
    compute op codes (``done``, ``_NEVER``: not run yet; ``before``/``after``: the previous and
    next rank's), and per unit its offload's end and its reload's issue time (``_NEVER``: none
    waiting) and step: a reload is timed by the first op needing its unit resident. ``shape``:
    (rank, last rank, microbatches, units per rank, p2p latency)."""

    __slots__ = ("shape", "duration", "kind_of", "codes", "count", "done", "before", "after",
                 "position", "clock", "busy", "start", "end", "offload_end", "reload_issue",
                 "reload_step", "d2h", "h2d")

    def __init__(self, rank: int, pp: int, m: int, units: int, latency: float,
                 duration: list[float], kind_of: list[int], codes, d2h, h2d) -> None:
        self.shape = (rank, pp - 1, m, units, latency)  # what advance() reads, in one go
        self.duration, self.kind_of, self.codes, self.count = duration, kind_of, codes, len(codes)
        self.done = [_NEVER] * slot_width(units)
        self.before = self.after = self.done
        self.position, self.clock, self.busy = 0, 0.0, 0.0
        self.start: list[float] = []
        self.end: list[float] = []
        self.offload_end, self.reload_issue = [_NEVER] * units, [_NEVER] * units
        self.reload_step = [0] * units
        self.d2h, self.h2d = d2h, h2d

    def advance(self) -> bool:
        """Run ops until one's p2p input is missing (or the end); True if any ran."""
        rank, last, m, units, latency = self.shape
        duration, kind_of, roles, sources = self.duration, self.kind_of, _ROLE, _SOURCE
        codes, mine = self.codes, self.done
        before, after = self.before, self.after
        t, work = self.clock, self.busy
        step = begin = self.position
        count = self.count
        my_start, my_end = self.start, self.end
        d2h, h2d = self.d2h, self.h2d
        my_offload, my_issue, my_reload_step = self.offload_end, self.reload_issue, self.reload_step
        while step < count:
            code = codes[step]
            kind = kind_of[code]
            role = roles[kind]
            unit = code - kind * units
            if role <= _COMPUTE_RESIDENT:
                ready = t
                source = sources[kind]
                if source < 0:  # input from the previous virtual stage
                    if rank > 0 or unit >= m:
                        arrived = before[code if rank > 0 else code - m]
                        if arrived < 0:
                            break
                        arrived += latency
                        if arrived > ready:
                            ready = arrived
                elif source > 0:  # input from the next virtual stage
                    if rank < last or unit < units - m:
                        arrived = after[code if rank < last else code + m]
                        if arrived < 0:
                            break
                        arrived += latency
                        if arrived > ready:
                            ready = arrived
                if role == _COMPUTE_RESIDENT and my_issue[unit] >= 0:
                    # offloaded: reload so that it ends at `ready`, but not before its issue, its
                    # offload's end or (in lane order) the H2D lane's previous copy
                    at = my_reload_step[unit]
                    copy = duration[codes[at]]  # its H2D copy's time
                    begin_copy = ready - copy
                    for bound in (my_issue[unit], my_offload[unit]):
                        if bound > begin_copy:
                            begin_copy = bound
                    my_issue[unit] = _NEVER  # timed by the unit's first op needing it resident
                    begin_copy = h2d.place(begin_copy, copy)
                    my_start[at], my_end[at] = begin_copy, begin_copy + copy
                    if begin_copy + copy > ready:
                        ready = begin_copy + copy
                finish = ready + duration[code]
                work += duration[code]
                mine[code] = t = finish
            elif role == _D2H:  # issued now, runs when the D2H lane is free
                ready = d2h.place(t, duration[code])
                finish = my_offload[unit] = ready + duration[code]
            else:  # H2D: issued now; timed when an op needing its unit resident is reached
                my_issue[unit] = ready = finish = t
                my_reload_step[unit] = len(my_start)
            my_start.append(ready)
            my_end.append(finish)
            step += 1
        self.position = step
        self.clock, self.busy = t, work
        return step != begin


def _general_result(schedule: Schedule, costs: CostModel, ranks: list[_GeneralRank]) -> Simulation:
    allocates, frees, is_d2h = _ALLOCATES.tolist(), _FREES.tolist(), _IS_D2H.tolist()
    reserve, release = [], []
    offloaded = 0
    for run in ranks:
        codes, kind_of = run.codes, run.kind_of
        res = [run.start[i] for i, code in enumerate(codes) if allocates[kind_of[code]]]
        rel = [run.end[i] for i, code in enumerate(codes) if frees[kind_of[code]]]
        offloaded += sum(1 for code in codes if is_d2h[kind_of[code]])
        res.sort()
        rel.sort()
        reserve.append(res)
        release.append(rel)
    ends = [run.end for run in ranks]
    makespan = max((max(e) for e in ends if e), default=0.0)
    return Simulation(
        schedule=schedule,
        costs=costs,
        start=[run.start for run in ranks],
        end=ends,
        makespan=makespan,
        busy=[run.busy for run in ranks],
        peak_units=[_peak(res, rel) for res, rel in zip(reserve, release)],
        offloaded_units=offloaded,
        no_offload_makespan=makespan,
        _reserve=reserve,
        _release=release,
    )


def _run_private(schedule: Schedule, costs: CostModel) -> Simulation:
    """:func:`_run_general` for one lane pair per rank (no shared link), same results, faster.

    Every rank's timing then depends only on its own ops and its inputs' arrival times, so the
    order in which ranks are advanced does not matter. Per step the dependency and output slots
    are precomputed (numpy, :func:`_private_ranks`) into one flat table of arrival times
    (producer end + latency; None = not produced yet), which keeps the hot loop to a handful of
    list reads. A rank blocked on a missing input is woken only once that input exists: in
    1F1B-like schedules ranks advance a step or two at a time, so needless wake-ups would
    dominate."""
    pp, last = schedule.pp, schedule.pp - 1
    ranks, arrival = _private_ranks(schedule, costs)
    latency = costs.p2p_latency if pp > 1 else 0.0
    # Per rank, the slot of the input it waits for: at first the one always filled (0.0); once
    # the rank is done, the one never filled.
    done_slot = len(arrival) - 1
    waiting = [done_slot - 1] * pp
    queued = bytearray([1]) * pp
    neighbours = [tuple(sorted({rank - 1, rank + 1, 0, last} - {rank, -1, pp}))
                  for rank in range(pp)]
    pending = list(range(pp))
    while pending:
        rank = pending.pop()
        queued[rank] = 0
        run = ranks[rank]
        begin = run.position
        step = run.advance(arrival, latency)
        waiting[rank] = run.dep[step] if step < run.count else done_slot
        if step != begin:
            for other in neighbours[rank]:
                if not queued[other] and arrival[waiting[other]] is not None:
                    queued[other] = 1
                    pending.append(other)
    if any(run.position < run.count for run in ranks):
        validate_schedule(schedule)  # raises with the grid
        raise AssertionError("simulation stalled on a schedule that validates")  # pragma: no cover
    return _result(schedule, costs, [run.start for run in ranks], [run.end for run in ranks],
                   [run.kind for run in ranks], [run.busy() for run in ranks])


def _private_ranks(schedule: Schedule, costs: CostModel) -> tuple[list[_PrivateRank], list]:
    """Per rank of :func:`_run_private` its steps, precomputed; and the flat table of arrival
    times, one slot per compute op of every rank (``rank * slot_width + code``), then a slot
    always 0.0 (the input of ops without a p2p input) and a last one never filled."""
    pp, vpp, m = schedule.pp, schedule.vpp, schedule.microbatches
    units = vpp * m
    per_chunk = lambda cost: np.array([cost(c) for c in range(vpp)], dtype=float)  # noqa: E731
    chunk_of = np.arange(units) // m
    # Duration by op code (every kind of every unit).
    duration_of = np.concatenate([per_chunk(lambda c, kind=kind: costs.time(kind, c))[chunk_of]
                                  for kind in OpKind])
    width = slot_width(units)
    sentinel = pp * width
    ranks = []
    for rank, row in enumerate(schedule.program()):
        codes = np.asarray(row, dtype=np.int64).reshape(-1)
        kind = codes // units
        compute = kind < FIRST_COPY_CODE
        steps = (_ROLES[kind].tolist(), (codes - kind * units).tolist(),
                 input_slots(codes, rank, pp, units, m, sentinel).tolist(),
                 (rank * width + codes).tolist(), duration_of[codes].tolist())
        compute_dur = duration_of[codes[compute]]
        if compute.all():
            ranks.append(_PrivateRank(steps, compute_dur, kind))
        else:
            ranks.append(_PrivateCopyRank(steps, compute_dur, kind, units))
    return ranks, [None] * sentinel + [0.0, None]


class _PrivateRank:
    """One rank of :func:`_run_private` with compute ops only. ``steps``: per step its role,
    unit, input slot (``dep``) and output slot (``out``) in the arrival table, and duration;
    ``position``, ``clock`` (end of its last compute op), and its start/end times so far.
    (The hot loops read the per-step lists with one unpacking of ``steps`` per call.)"""

    __slots__ = ("steps", "dep", "compute_dur", "kind", "count", "position", "clock", "start",
                 "end")

    def __init__(self, steps: tuple[list, list, list, list, list], compute_dur: np.ndarray,
                 kind: np.ndarray) -> None:
        self.steps, self.dep, self.count = steps, steps[2], len(steps[4])
        self.compute_dur, self.kind = compute_dur, kind
        self.position, self.clock = 0, 0.0
        self.start: list[float] = []
        self.end: list[float] = []

    def busy(self) -> float:
        # a running sum, as the general engine
        dur = self.compute_dur
        return float(np.add.accumulate(dur)[-1]) if len(dur) else 0.0

    def advance(self, arrival: list, latency: float) -> int:
        """Run until a step's input is missing (or the end); returns the step reached."""
        _, _, dep, out, dur = self.steps
        add_start = self.start.append
        add_end = self.end.append
        t = self.clock
        step = begin = self.position
        count = self.count
        for step in range(begin, count):
            arrived = arrival[dep[step]]
            if arrived is None:
                break
            ready = arrived if arrived > t else t
            t = ready + dur[step]
            arrival[out[step]] = t + latency
            add_start(ready)
            add_end(t)
        else:
            step = count
        self.position = step
        self.clock = t
        return step


class _PrivateCopyRank(_PrivateRank):
    """A rank of :func:`_run_private` with copies: its own D2H and H2D lane (when each is free),
    and per unit its offload's end and its reload's issue time (-1.0: none waiting) and step."""

    __slots__ = ("d2h", "h2d", "offload_end", "reload_issue", "reload_step")

    def __init__(self, steps: tuple[list, list, list, list, list], compute_dur: np.ndarray,
                 kind: np.ndarray, units: int) -> None:
        _PrivateRank.__init__(self, steps, compute_dur, kind)
        self.d2h = self.h2d = 0.0
        self.offload_end = [-1.0] * units
        self.reload_issue = [-1.0] * units
        self.reload_step = [0] * units

    def advance(self, arrival: list, latency: float) -> int:
        roles, unit_of, dep, out, dur = self.steps
        my_start = self.start
        my_end = self.end
        add_start = my_start.append
        add_end = my_end.append
        my_offload = self.offload_end
        my_issue = self.reload_issue
        my_reload_step = self.reload_step
        t = self.clock
        step = begin = self.position
        count = self.count
        d2h_lane = self.d2h
        h2d_lane = self.h2d
        for step in range(begin, count):
            role = roles[step]
            if role <= _COMPUTE_RESIDENT:
                arrived = arrival[dep[step]]
                if arrived is None:
                    break
                ready = arrived if arrived > t else t
                if role == _COMPUTE_RESIDENT:
                    unit = unit_of[step]
                    issue = my_issue[unit]
                    if issue >= 0:  # offloaded: reload so that it ends at `ready`
                        # (timed by the unit's first op needing it resident), but not before
                        # its issue, its offload's end or the H2D lane's previous copy
                        my_issue[unit] = -1.0
                        at = my_reload_step[unit]
                        copy = dur[at]  # its H2D copy's time
                        begin_copy = ready - copy
                        if issue > begin_copy:
                            begin_copy = issue
                        if my_offload[unit] > begin_copy:
                            begin_copy = my_offload[unit]
                        if h2d_lane > begin_copy:
                            begin_copy = h2d_lane
                        h2d_lane = begin_copy + copy
                        my_start[at] = begin_copy
                        my_end[at] = h2d_lane
                        if h2d_lane > ready:
                            ready = h2d_lane
                t = ready + dur[step]
                arrival[out[step]] = t + latency
                add_start(ready)
                add_end(t)
            elif role == _D2H:  # issued now, runs when the D2H lane is free
                ready = t if t > d2h_lane else d2h_lane
                d2h_lane = ready + dur[step]
                my_offload[unit_of[step]] = d2h_lane
                add_start(ready)
                add_end(d2h_lane)
            else:  # H2D: issued now; timed when an op needing its unit resident is reached
                unit = unit_of[step]
                my_issue[unit] = t
                my_reload_step[unit] = len(my_start)
                add_start(t)
                add_end(t)
        else:
            step = count
        self.position = step
        self.clock = t
        self.d2h = d2h_lane
        self.h2d = h2d_lane
        return step


def _result(schedule, costs, starts, ends, kinds, busy) -> Simulation:
    """The Simulation from per-step times; ``kinds[r]``: op kind code per step of rank r (numpy)."""
    reserve, release, peaks = [], [], []
    offloaded = 0
    makespan = 0.0
    for rank in range(schedule.pp):
        kind = kinds[rank]
        begin_times, end_times = (np.asarray(starts[rank], dtype=float),
                                  np.asarray(ends[rank], dtype=float))
        res = np.sort(begin_times[_ALLOCATES[kind]])
        rel = np.sort(end_times[_FREES[kind]])
        offloaded += int(np.count_nonzero(_IS_D2H[kind]))
        reserve.append(res)
        release.append(rel)
        # After the i-th reservation (0-based) at time t: i + 1 -
        # (releases at or before t) resident.
        level = np.arange(1, len(res) + 1) - np.searchsorted(rel, res, side="right")
        peaks.append(max(0, int(level.max(initial=0))))
        if len(end_times):
            makespan = max(makespan, float(end_times.max()))
    return Simulation(
        schedule=schedule,
        costs=costs,
        start=starts,
        end=ends,
        makespan=makespan,
        busy=busy,
        peak_units=peaks,
        offloaded_units=offloaded,
        no_offload_makespan=makespan,
        _reserve=reserve,
        _release=release,
    )


def _run_hinted(schedule: Schedule, costs: CostModel, base: Simulation) -> Simulation | None:
    """Time ``schedule`` from ``base``, a simulation of its compute ops alone with the same
    costs (one lane pair per rank): if every reload ends by the time its backward could start,
    the copies never touch compute, so every compute op keeps its time from ``base`` and only
    the copies need timing, with the same arithmetic as :func:`_run_private` (identical results).
    Returns None when that does not hold (some reload is late, or the ops are not the simple
    F, O, R, B per unit shape, or another kind appears): the caller then runs the full engine."""
    units, pp = schedule.units_per_rank, schedule.pp
    program, base_program = schedule.program(), base.schedule.program()
    vpp, m = schedule.vpp, schedule.microbatches
    chunk_of = np.arange(units) // m
    d2h = np.array([costs.offload(c) for c in range(vpp)])[chunk_of]
    h2d = np.array([costs.reload(c) for c in range(vpp)])[chunk_of]
    starts, ends, kinds = [], [], []
    for rank in range(pp):
        codes = np.asarray(program[rank], dtype=np.int64).reshape(-1)
        kind = codes // units
        if not _HINTABLE[kind].all():
            return None
        unit = codes - kind * units
        compute = kind < FIRST_COPY_CODE
        base_codes = np.asarray(base_program[rank], dtype=np.int64).reshape(-1)
        if np.count_nonzero(compute) != len(base_codes) or not np.array_equal(
            codes[compute], base_codes
        ):
            return None
        steps = np.arange(len(codes))
        o_steps, r_steps = steps[kind == KIND_O], steps[kind == KIND_R]
        o_units, r_units = unit[o_steps], unit[r_steps]
        b_step_of = np.empty(units, dtype=np.int64)
        b_step_of[unit[kind == KIND_B]] = steps[kind == KIND_B]
        o_step_of = np.full(units, -1, dtype=np.int64)
        o_step_of[o_units] = o_steps
        if (np.bincount(o_units, minlength=units).max(initial=0) > 1
                or np.bincount(r_units, minlength=units).max(initial=0) > 1
                or np.any(b_step_of[r_units] < r_steps) or np.any(b_step_of[o_units] < o_steps)):
            return None
        base_start, base_end = (np.asarray(base.start[rank], dtype=float),
                                np.asarray(base.end[rank], dtype=float))
        start, end = np.empty(len(codes)), np.empty(len(codes))
        start[compute], end[compute] = base_start, base_end
        # The clock at each step: end of the last compute op before it (0.0 before the first).
        last_compute = np.cumsum(compute) - 1
        clock = np.where(last_compute >= 0, np.concatenate((base_end, [0.0]))[last_compute], 0.0)
        # Offloads: FIFO on the D2H lane in list order, issued at the clock.
        free = 0.0
        o_start, o_end = [], []
        for t, copy in zip(clock[o_steps].tolist(), d2h[o_units].tolist()):
            ready = t if t > free else free
            free = ready + copy
            o_start.append(ready)
            o_end.append(free)
        start[o_steps], end[o_steps] = o_start, o_end
        offload_end = np.full(units, -1.0)
        offload_end[o_units] = o_end
        issue = clock[r_steps]
        start[r_steps], end[r_steps] = issue, issue
        # Reloads: in backward order, just in time, after issue, offload and the previous reload.
        order = np.argsort(b_step_of[r_units], kind="stable")
        due_units = r_units[order]
        # the backward's start in base
        due = base_start[np.cumsum(compute)[b_step_of[due_units]] - 1]
        free = 0.0
        r_start = []
        for ready, copy, issued, offloaded in zip(due.tolist(), h2d[due_units].tolist(),
                                                  issue[order].tolist(),
                                                  offload_end[due_units].tolist()):
            begin = ready - copy
            if issued > begin:
                begin = issued
            if offloaded > begin:
                begin = offloaded
            if free > begin:
                begin = free
            free = begin + copy
            if free > ready:
                return None  # this reload delays its backward: compute times change
            r_start.append(begin)
        r_start = np.asarray(r_start, dtype=float)
        start[r_steps[order]] = r_start
        end[r_steps[order]] = r_start + h2d[due_units]
        starts.append(start.tolist())
        ends.append(end.tolist())
        kinds.append(kind)
    return _result(schedule, costs, starts, ends, kinds, list(base.busy))
