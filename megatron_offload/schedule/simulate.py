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
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .costs import CostModel
from .ir import Schedule


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
    _reserve: list[list[float]] = field(repr=False, default_factory=list)
    _release: list[list[float]] = field(repr=False, default_factory=list)

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
        for time, delta in _events(self._reserve[rank], self._release[rank]):
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


def simulate(schedule: Schedule, costs: CostModel | None = None, *, no_offload_makespan: float | None = None) -> Simulation:
    """Simulate ``schedule``; raises ScheduleError if it deadlocks (validate first for the grid).

    With offload ops, the same order is also simulated without them for ``slowdown``, unless
    ``no_offload_makespan`` is given (the offload pass has it: ``plan.baseline.makespan``)."""
    costs = costs or CostModel()
    costs.check_chunks(schedule.vpp)
    result = _run(schedule, costs)
    if no_offload_makespan is not None:
        result.no_offload_makespan = no_offload_makespan
    elif result.offloaded_units:
        result.no_offload_makespan = _run(schedule.without_offload(), costs).makespan
    return result


def _run(schedule: Schedule, costs: CostModel) -> Simulation:
    pp, vpp, m = schedule.pp, schedule.vpp, schedule.microbatches
    units = vpp * m
    program = schedule.program()
    fwd = [costs.forward(unit // m) for unit in range(units)]
    bwd = [costs.backward(unit // m) for unit in range(units)]
    d2h = [costs.offload(unit // m) for unit in range(units)]
    h2d = [costs.reload(unit // m) for unit in range(units)]
    latency = costs.p2p_latency
    never = -1.0
    # done[r][code] for F and B codes: end time (never = not run yet); copies per unit.
    done = [[never] * (2 * units) for _ in range(pp)]
    offload_end = [[never] * units for _ in range(pp)]
    reload_issue = [[never] * units for _ in range(pp)]
    reload_step = [[0] * units for _ in range(pp)]
    starts = [[] for _ in range(pp)]
    ends = [[] for _ in range(pp)]
    clock = [0.0] * pp
    busy = [0.0] * pp
    shared = costs.shared_link and pp > 1
    lanes = max(costs.link_of(r) for r in range(pp)) + 1
    d2h_free, h2d_free = [0.0] * lanes, [0.0] * lanes
    d2h_shared = [_SharedLane() for _ in range(lanes)] if shared else None
    h2d_shared = [_SharedLane() for _ in range(lanes)] if shared else None
    position = [0] * pp
    pending = list(range(pp))
    last = pp - 1
    while pending:
        rank = pending.pop()
        codes, mine, step = program[rank], done[rank], position[rank]
        before = done[rank - 1] if rank > 0 else done[last]
        after = done[rank + 1] if rank < last else done[0]
        lat_before = latency if pp > 1 else 0.0
        t, work = clock[rank], busy[rank]
        my_start, my_end = starts[rank], ends[rank]
        my_offload, my_issue, my_reload_step = offload_end[rank], reload_issue[rank], reload_step[rank]
        lane = costs.link_of(rank)
        begin, count = step, len(codes)
        while step < count:
            code = codes[step]
            if code < units:  # forward: input from the previous virtual stage
                ready = t
                if rank > 0 or code >= m:
                    arrived = before[code if rank > 0 else code - m]
                    if arrived < 0:
                        break
                    arrived += lat_before
                    if arrived > ready:
                        ready = arrived
                finish = ready + fwd[code]
                work += fwd[code]
                mine[code] = finish
            elif code < 2 * units:  # backward: gradient from the next virtual stage
                unit = code - units
                ready = t
                if rank < last or unit < units - m:
                    arrived = after[code if rank < last else code + m]
                    if arrived < 0:
                        break
                    arrived += lat_before
                    if arrived > ready:
                        ready = arrived
                if my_issue[unit] >= 0:  # offloaded: reload so that it ends as `ready`
                    copy = h2d[unit]
                    begin_copy = ready - copy
                    for bound in (my_issue[unit], my_offload[unit]):
                        if bound > begin_copy:
                            begin_copy = bound
                    if shared:
                        begin_copy = h2d_shared[lane].place(begin_copy, copy)
                    elif h2d_free[lane] > begin_copy:
                        begin_copy = h2d_free[lane]
                    h2d_free[lane] = begin_copy + copy
                    my_start[my_reload_step[unit]] = begin_copy
                    my_end[my_reload_step[unit]] = begin_copy + copy
                    if begin_copy + copy > ready:
                        ready = begin_copy + copy
                finish = ready + bwd[unit]
                work += bwd[unit]
                mine[code] = finish
            elif code < 3 * units:  # offload: issued now, runs when the D2H lane is free
                unit = code - 2 * units
                if shared:
                    ready = d2h_shared[lane].place(t, d2h[unit])
                else:
                    ready = t if t > d2h_free[lane] else d2h_free[lane]
                finish = ready + d2h[unit]
                d2h_free[lane] = finish
                my_offload[unit] = finish
                my_start.append(ready)
                my_end.append(finish)
                step += 1
                continue
            else:  # reload: issued now; timed when its backward is reached (just in time)
                unit = code - 3 * units
                my_issue[unit] = t
                my_reload_step[unit] = len(my_start)
                my_start.append(t)
                my_end.append(t)
                step += 1
                continue
            my_start.append(ready)
            my_end.append(finish)
            t = finish
            step += 1
        position[rank], clock[rank], busy[rank] = step, t, work
        if step != begin:
            for other in {rank - 1, rank + 1, 0, last}:
                if 0 <= other < pp and other != rank and position[other] < len(program[other]) and other not in pending:
                    pending.append(other)
    if any(position[r] < len(program[r]) for r in range(pp)):
        schedule.validate()  # raises with the grid
        raise AssertionError("simulation stalled on a schedule that validates")  # pragma: no cover
    reserve, release = [], []
    offloaded = 0
    for rank in range(pp):
        codes, begin_times, end_times = program[rank], starts[rank], ends[rank]
        res = [begin_times[i] for i, code in enumerate(codes) if code < units or code >= 3 * units]
        rel = [end_times[i] for i, code in enumerate(codes) if units <= code < 3 * units]
        offloaded += sum(1 for code in codes if 2 * units <= code < 3 * units)
        res.sort()
        rel.sort()
        reserve.append(res)
        release.append(rel)
    makespan = max((max(e) for e in ends if e), default=0.0)
    return Simulation(
        schedule=schedule,
        costs=costs,
        start=starts,
        end=ends,
        makespan=makespan,
        busy=busy,
        peak_units=[_peak(reserve[r], release[r]) for r in range(pp)],
        offloaded_units=offloaded,
        no_offload_makespan=makespan,
        _reserve=reserve,
        _release=release,
    )
