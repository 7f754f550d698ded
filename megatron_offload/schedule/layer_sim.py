"""Byte-level simulation of layer-streaming orders (issue 10). Pure Python, no torch.

Runs each rank's expanded order (:mod:`.layers`) and tracks the device bytes of saved
activations with the memory rule of :func:`.layers.memory_effect`, from a per-layer profile
(:class:`.layers.LayerProfile`, measured by the runtime or modelled).

Execution model: a rank runs its entries in list order on one compute stream. A compute entry
starts when the previous one ended, and (multi-rank run) a unit-level F(c,m) / B(c,m) also
waits for its input: the producer's forward end (after its epilogue) / its backward end
(after B(c,m,0)) plus ``p2p_latency``; a backward entry waits for the reload of the sub-unit
it uses (that wait is the *stall*). The epilogue (rest's forward after the last layer) runs
after the unit's last layer entry (its F, or the O issued with it). Copies are issued at their
place in the list (the clock = end of the previous compute):

- no link (``link`` None, the CPU backend): copies are synchronous and instantaneous; an O
  frees its bytes at once, an R adds them at once;
- with a :class:`.layers.LinkModel`: an O runs on the D2H lane from its issue and frees its
  bytes when it completes; an R runs on the H2D lane from max(issue, lane free, end of its own
  O) and adds its bytes when it starts. Each rank's copies of one direction run in issue order
  (one stream). With ``link.shared`` ranks 2i and 2i+1 share the lanes: a copy takes the
  earliest gap after it is ready (as in simulate.py, an approximation of two streams
  contending for one link).

Memory: the level starts at ``profile.base_bytes``; a compute entry's candidate peak is the
level plus its transient, at its start and whenever a copy adds bytes while it runs (copies
that start mid-entry count on top of the transient, conservatively). At equal times an
asynchronous D2H completion counts first, then events in program order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .ir import Op, producer
from .kinds import Flow, Lane, OpKind
from .layers import (
    EPILOGUE,
    LayerProfile,
    LayerSchedule,
    LinkModel,
    check_rank,
    forward_ends,
    memory_effect,
)
from .simulate import _COMPUTE_RESIDENT, _D2H, _ROLE, _FifoLane, _SharedLane, gc_paused

_DELTA, _START, _END, _MARK = 0, 1, 2, 3


@dataclass(kw_only=True, slots=True)
class LayerSimulation:
    """One rank's layer-level run. Per entry i of ``ops``: ``start[i]``/``end[i]`` (compute
    entries: on the compute stream; O/R: the copy on its lane), ``issue[i]`` (the clock when
    the rank reached it), ``level_after[i]`` (bytes right after it in program order: compute at
    its end, copies at their issue; the epilogue belongs to the entry it follows) and
    ``peak_in[i]`` (the highest candidate while it runs, copies: the level at issue)."""

    rank: int
    ops: tuple[Op, ...]
    start: list[float]
    end: list[float]
    issue: list[float]
    level_after: list[float]
    peak_in: list[float]
    peak_bytes: float
    """The highest level plus transient (device bytes of activations, incl. base_bytes)."""
    peak_entry: int
    """Index of the entry during which the peak occurs (-1: none)."""
    curve: list[tuple[float, float, float]]
    """(time, level, level + running entry's transient) after every change: the picture's
    memory curve."""
    epilogues: list[tuple[int, int, float, float]]
    """(chunk, microbatch, start, end) of each unit's epilogue (no IR entry of its own)."""
    copies: int
    """D2H copies (each has one H2D copy back)."""
    offloaded_bytes: float
    reloaded_bytes: float
    stall: float
    """Time backward entries waited for their reloads."""
    busy: float
    """Compute time (entries and epilogues)."""
    finish: float
    """When the rank's last entry or copy ended."""
    link: LinkModel | None = None

    def sub_unit_copies(self) -> dict:
        """sub-unit -> (O start, O end, R start, R end)."""
        table: dict = {}
        for i, op in enumerate(self.ops):
            if op.kind is OpKind.OFFLOAD:
                table[op.sub_unit] = [self.start[i], self.end[i], None, None]
            elif op.kind is OpKind.RELOAD:
                table[op.sub_unit][2:] = [self.start[i], self.end[i]]
        return {key: tuple(value) for key, value in table.items()}


@dataclass(kw_only=True, slots=True)
class LayerScheduleSimulation:
    schedule: LayerSchedule | None
    ranks: list[LayerSimulation] = field(default_factory=list)

    @property
    def peak_bytes(self) -> list[float]:
        return [r.peak_bytes for r in self.ranks]

    @property
    def makespan(self) -> float:
        return max((r.finish for r in self.ranks), default=0.0)

    @property
    def copies(self) -> list[int]:
        return [r.copies for r in self.ranks]

    @property
    def stall(self) -> list[float]:
        return [r.stall for r in self.ranks]


def simulate_layers(ops: Sequence[Op], profile: LayerProfile, link: LinkModel | None = None, *,
                    rank: int = 0) -> LayerSimulation:
    """Simulate one rank's expanded order on its own (no waits for other ranks)."""
    with gc_paused():
        return _run([tuple(ops)], [profile], link, deps=None, p2p_latency=0.0, ranks=[rank])[0]


def simulate_layer_schedule(schedule: LayerSchedule, profile: LayerProfile | Sequence[LayerProfile],
                            link: LinkModel | None = None, *,
                            p2p_latency: float = 0.0) -> LayerScheduleSimulation:
    """Simulate every rank together: unit-level entries wait for their p2p inputs, ranks
    sharing a link (``link.shared``) share its lanes. ``profile``: one for every rank, or one
    per rank."""
    profiles = [profile] * schedule.pp if isinstance(profile, LayerProfile) else list(profile)
    if len(profiles) != schedule.pp:
        raise ValueError(
            f"{len(profiles)} profiles for {schedule.pp} ranks; give one, or one per rank")
    for rank, p in enumerate(profiles):
        p.check_layers(schedule.layers_of_rank(rank))
    with gc_paused():
        sims = _run(list(schedule.ranks), profiles, link, deps=(schedule.pp, schedule.vpp),
                    p2p_latency=p2p_latency, ranks=list(range(schedule.pp)))
    return LayerScheduleSimulation(schedule=schedule, ranks=sims)


def _run(rank_ops: list[tuple[Op, ...]], profiles: list[LayerProfile], link: LinkModel | None, *,
         deps: tuple[int, int] | None, p2p_latency: float,
         ranks: list[int]) -> list[LayerSimulation]:
    """Simulate the ranks of ``rank_ops`` together: ``deps`` (pp, vpp) makes unit-level entries
    wait for their p2p inputs (None: each rank on its own). Each rank runs until an input is
    missing; a rank that advanced wakes the others."""
    for ops in rank_ops:
        check_rank(ops, strict=False)
    tables = [_compile(ops, profile, link) for ops, profile in zip(rank_ops, profiles)]
    runs = _rank_runs(rank_ops, tables, profiles, link, deps, p2p_latency, ranks)
    pending = list(range(len(runs)))
    while pending:
        me = pending.pop()
        if runs[me].advance() and deps is not None:
            for other, run in enumerate(runs):
                if other != me and not run.finished and other not in pending:
                    pending.append(other)
    stuck = [run for run in runs if not run.finished]
    if stuck:
        details = "; ".join(f"rank {run.rank} at step {run.position} ({run.ops[run.position]})"
                            for run in stuck)
        raise ValueError(f"the layer schedule deadlocks: {details}")
    return [run.result(link) for run in runs]


def _compile(ops: tuple[Op, ...], profile: LayerProfile, link: LinkModel | None) -> list[tuple]:
    """One rank's entries table: per entry (kind, role, chunk, mb, layer, duration, transient,
    change, ends_forward). The role (compute, compute needing its sub-unit resident, D2H or H2D
    copy) comes from the kinds table, as in simulate.py; a copy's duration is its link time (0.0
    without a link)."""
    ends = forward_ends(ops)
    table = []
    for index, op in enumerate(ops):
        try:
            transient, change = memory_effect(op.kind, op.chunk, op.layer, profile, op.microbatch)
        except IndexError:
            raise ValueError(f"entry {index} ({op}) is outside the profile's layers per chunk "
                             f"{list(profile.layers)}") from None
        duration = profile.duration(op) if op.is_compute else 0.0
        if link is not None and not op.is_compute:
            nbytes = profile.sub_unit_bytes(op.chunk, op.layer, op.microbatch)
            duration = (
                link.d2h_time(nbytes) if op.kind.lane is Lane.D2H else link.h2d_time(nbytes)
            )
        table.append((op.kind, _ROLE[op.kind.code], op.chunk, op.microbatch, op.layer, duration,
                      transient, change, index in ends))
    return table


def _rank_runs(rank_ops, tables, profiles, link, deps, p2p_latency, ranks) -> list[_RankRun]:
    """One :class:`_RankRun` per rank, with its copy lanes (shared by ranks 2i and 2i+1 with
    ``link.shared``) and the table of unit outputs every rank reads its inputs from."""
    count = len(rank_ops)
    shared = link is not None and link.shared and count > 1
    lane_ids = [link.lane_of(r) if link is not None else r for r in ranks]
    lane_type = _SharedLane if shared else _FifoLane
    d2h = {lane: lane_type() for lane in set(lane_ids)}
    h2d = {lane: lane_type() for lane in set(lane_ids)}
    # Per kind that sends: per rank, (chunk, mb) -> time the unit's output exists: a forward-pass
    # kind's after the epilogue (which follows the last layer), a backward-pass kind's after
    # its layer-0 entry.
    output_at = {kind: [{} for _ in range(count)] for kind in OpKind if kind.sends is not None}
    return [_RankRun(index, ranks[index], rank_ops[index], tables[index], profiles[index],
                     d2h[lane_ids[index]], h2d[lane_ids[index]], sync=link is None,
                     output_at=output_at, deps=deps, p2p_latency=p2p_latency)
            for index in range(count)]


class _RankRun:
    """One rank in :func:`_run`: where it stands in its entries table, the times of its entries,
    its memory events ``(time, phase, seq, what, value, index)`` (sorted at the end by
    :func:`_memory`: phase 0, an asynchronous copy's change, counts before program order at equal
    times; seq keeps program order), and the steps that advance it."""

    __slots__ = ("index", "rank", "ops", "table", "profile", "d2h", "h2d", "sync", "output_at",
                 "deps", "p2p_latency", "position", "clock", "seq", "events", "start", "end",
                 "issue", "stall", "busy", "epilogues", "offload_end", "reload_end", "own_d2h",
                 "own_h2d")

    def __init__(self, index: int, rank: int, ops: tuple[Op, ...], table: list[tuple],
                 profile: LayerProfile, d2h, h2d, *, sync: bool, output_at: dict,
                 deps: tuple[int, int] | None, p2p_latency: float) -> None:
        self.index, self.rank, self.ops, self.table, self.profile = index, rank, ops, table, profile
        self.d2h, self.h2d, self.sync = d2h, h2d, sync
        self.output_at, self.deps, self.p2p_latency = output_at, deps, p2p_latency
        self.position, self.clock, self.seq = 0, 0.0, 0
        self.events: list[tuple] = []
        self.start, self.end, self.issue = ([0.0] * len(table) for _ in range(3))
        self.stall = self.busy = 0.0
        self.epilogues: list[tuple[int, int, float, float]] = []
        self.offload_end: dict = {}  # sub-unit -> end of its D2H copy
        self.reload_end: dict = {}  # sub-unit -> end of its H2D copy
        self.own_d2h = self.own_h2d = 0.0  # this rank's stream of each direction is free then

    @property
    def finished(self) -> bool:
        return self.position >= len(self.table)

    def advance(self) -> bool:
        """Run entries until the next one's p2p input is missing (or the end); True if any ran.

        The clock is the end of the previous compute entry (or epilogue): compute entries start
        at the clock or when their input and reload are there, copies are issued at it."""
        table, t, n = self.table, self.clock, self.seq
        ev, my_start, my_end, my_issue = self.events, self.start, self.end, self.issue
        reload_end, unit_inputs = self.reload_end, self.deps is not None
        step = begin = self.position
        while step < len(table):
            kind, role, chunk, mb, layer, duration, transient, change, ends_forward = table[step]
            my_issue[step] = t  # (an entry blocked on its input is reached again at this t)
            if role <= _COMPUTE_RESIDENT:
                ready = t
                if layer is None and unit_inputs:
                    ready = self._input_ready(kind, chunk, mb, ready)
                    if ready is None:
                        break
                if role == _COMPUTE_RESIDENT:
                    back = reload_end.get((chunk, mb, layer))
                    if back is not None and back > ready:
                        self.stall += back - ready
                        ready = back
                my_start[step], my_end[step] = ready, ready + duration
                ev.append((ready, 1, n, _START, transient, step))
                # the transient includes what it keeps
                ev.append((ready + duration, 1, n + 1, _END, 0.0, step))
                ev.append((ready + duration, 1, n + 2, _DELTA, change, step))
                ev.append((ready + duration, 1, n + 3, _MARK, 0.0, step))
                n += 4
                t = ready + duration
                self.busy += duration
                if layer == 0 and kind.sends is Flow.UPSTREAM:
                    self.output_at[kind][self.index][(chunk, mb)] = t
            elif role == _D2H:
                self._offload(step, t, n, (chunk, mb, layer), duration, change)
                n += 2
            else:
                self._reload(step, t, n, (chunk, mb, layer), duration, change)
                n += 2
            if ends_forward:  # the epilogue, then the unit's output exists
                t = self._epilogue(step, t, n, chunk, mb)
                n += 4
            step += 1
        self.position, self.clock, self.seq = step, t, n
        return step != begin

    def _input_ready(self, kind: OpKind, chunk: int, mb: int, ready: float) -> float | None:
        """``ready``, or later when the unit-level entry's p2p input arrives after it (None: not
        produced yet)."""
        pp, vpp = self.deps
        source = producer(self.rank, kind, chunk, pp, vpp)
        if source is None:
            return ready
        done = self.output_at[kind][source[0]].get((source[1], mb))
        if done is None:
            return None
        done += self.p2p_latency
        return done if done > ready else ready

    def _offload(self, step: int, t: float, n: int, key: tuple, duration: float,
                 change: float) -> None:
        """A D2H copy issued at ``t``: without a link it frees its bytes at once; else it runs
        on the D2H lane after this rank's previous D2H copy and frees them when it ends."""
        if self.sync:
            self.start[step] = self.end[step] = t
            self.events.append((t, 1, n, _DELTA, change, step))
        else:
            begin = self.d2h.place(max(t, self.own_d2h), duration)
            # one stream per rank and direction: its copies in order
            self.own_d2h = begin + duration
            self.start[step], self.end[step] = begin, begin + duration
            self.events.append((begin + duration, 0, n, _DELTA, change, step))
        self.events.append((t, 1, n + 1, _MARK, 0.0, step))
        self.offload_end[key] = self.end[step]

    def _reload(self, step: int, t: float, n: int, key: tuple, duration: float,
                change: float) -> None:
        """An H2D copy issued at ``t``: without a link it adds its bytes at once; else it runs on
        the H2D lane once its own D2H copy and this rank's previous H2D copy are done, and adds
        them when it starts."""
        if self.sync:
            begin = t
        else:
            ready = max(t, self.offload_end[key])
            begin = self.h2d.place(max(ready, self.own_h2d), duration)
            self.own_h2d = begin + duration
        self.start[step], self.end[step] = begin, begin + duration
        self.events.append((begin, 1 if begin == t else 0, n, _DELTA, change, step))
        self.events.append((t, 1, n + 1, _MARK, 0.0, step))
        self.reload_end[key] = begin + duration

    def _epilogue(self, step: int, t: float, n: int, chunk: int, mb: int) -> float:
        """The unit's epilogue after entry ``step``, from ``t``; returns its end, when the unit's
        forward output exists."""
        transient, change = memory_effect(EPILOGUE, chunk, None, self.profile, mb)
        duration = self.profile.epilogue_duration(chunk)
        end = t + duration
        self.events.append((t, 1, n, _START, transient, step))
        self.events.append((end, 1, n + 1, _END, 0.0, step))
        self.events.append((end, 1, n + 2, _DELTA, change, step))
        self.events.append((end, 1, n + 3, _MARK, 0.0, step))
        self.epilogues.append((chunk, mb, t, end))
        self.busy += duration
        self.output_at[OpKind.FORWARD][self.index][(chunk, mb)] = end
        return end

    def result(self, link: LinkModel | None) -> LayerSimulation:
        ops, profile = self.ops, self.profile
        level_after, peak_in, peak, peak_entry, curve = _memory(ops, self.events,
                                                                profile.base_bytes)
        copies = [i for i, op in enumerate(ops) if op.kind.lane is Lane.D2H]
        reloads = [i for i, op in enumerate(ops) if op.kind.lane is Lane.H2D]
        return LayerSimulation(
            rank=self.rank, ops=ops, start=self.start, end=self.end, issue=self.issue,
            level_after=level_after, peak_in=peak_in, peak_bytes=peak, peak_entry=peak_entry,
            curve=curve, epilogues=self.epilogues, copies=len(copies),
            offloaded_bytes=sum(profile.sub_unit_bytes(ops[i].chunk, ops[i].layer,
                                                       ops[i].microbatch) for i in copies),
            reloaded_bytes=sum(profile.sub_unit_bytes(ops[i].chunk, ops[i].layer,
                                                      ops[i].microbatch) for i in reloads),
            stall=self.stall, busy=self.busy, finish=max([*self.end, self.clock], default=0.0),
            link=link,
        )


def _memory(ops: tuple[Op, ...], events: list[tuple], level: float):
    """Replay one rank's memory events in time order from ``level`` (the base bytes):
    (level_after, peak_in, peak, peak_entry, curve) of :class:`LayerSimulation`."""
    transient = 0.0
    current = -1
    peak, peak_entry = level, -1
    level_after = [0.0] * len(ops)
    peak_in = [0.0] * len(ops)
    curve = [(0.0, level, level)]
    for time, _phase, _n, what, value, index in sorted(events):
        if what == _DELTA:
            level += value
        elif what == _START:
            transient, current = value, index
        elif what == _END:
            transient, current = 0.0, -1
        else:
            level_after[index] = level
            if not ops[index].is_compute and level > peak_in[index]:
                peak_in[index] = level
            continue
        candidate = level + transient
        if current >= 0 and candidate > peak_in[current]:
            peak_in[current] = candidate
        if candidate > peak:
            peak, peak_entry = candidate, current if current >= 0 else index
        if curve[-1][0] == time:
            curve[-1] = (time, level, candidate)
        else:
            curve.append((time, level, candidate))
    return level_after, peak_in, peak, peak_entry, curve


@dataclass(kw_only=True, slots=True)
class LayerPlan:
    """Layer streaming for a whole schedule, scored: what :func:`plan_layer_streaming` returns."""

    expanded: LayerSchedule
    """The layer-level orders with their copies: what the runtime issues, op for op."""
    simulation: LayerScheduleSimulation
    baseline: LayerScheduleSimulation
    """The same compute entries without any copy (peak bytes and makespan without offload)."""
    streamed: list[set]
    offloaded: list[set]
    distances: list
    """Per rank, the reload distance used (a number, or a mapping sub-unit -> distance)."""

    @property
    def slowdown(self) -> float:
        base = self.baseline.makespan
        return self.simulation.makespan / base - 1.0 if base else 0.0


def plan_layer_streaming(schedule, layers_per_chunk, profile: LayerProfile | Sequence[LayerProfile],
                         link: LinkModel | None = None, *, chunks: int | None = None,
                         reload_distance="auto", drop_unhidden: bool = True,
                         p2p_latency: float = 0.0, streamed: Sequence | None = None,
                         offloaded: Sequence | None = None) -> LayerPlan:
    """Expand ``schedule`` (unit-level :class:`.ir.Schedule`) with layer streaming, place the
    reloads and simulate it in bytes.

    Units: ``streamed``/``offloaded`` per rank, or by the rule of :func:`.layers.stream_sets`
    (units of chunks < ``chunks`` stream, those with a lifespan leave entirely; ``chunks``
    None = every chunk, 0 = none). ``reload_distance``: ``"auto"`` = as late as ``link``
    allows, timed on the run without copies (pipeline waits included), skipping copies the
    link cannot hide when ``drop_unhidden``; or what :func:`.layers.expand_schedule` takes."""
    from .layers import expand_schedule, reload_distances_for_link, stream_sets

    pp = schedule.pp
    if streamed is None or offloaded is None:
        sets = [stream_sets(ops, chunks) if chunks != 0 else (set(), set())
                for ops in schedule.ranks]
        streamed = [s for s, _ in sets] if streamed is None else streamed
        offloaded = [o for _, o in sets] if offloaded is None else offloaded
    streamed, offloaded = [set(s) for s in streamed], [set(o) for o in offloaded]
    nothing = [set()] * pp
    baseline = simulate_layer_schedule(
        expand_schedule(schedule, layers_per_chunk, nothing, nothing),
        profile,
        p2p_latency=p2p_latency,
    )
    if isinstance(reload_distance, str):
        if reload_distance != "auto":
            raise ValueError(
                f"reload distance {reload_distance!r}: give 'auto' or a number of compute entries")
        candidates = expand_schedule(schedule, layers_per_chunk, streamed, offloaded, 0)
        timing = simulate_layer_schedule(candidates, profile, p2p_latency=p2p_latency)
        profiles = [profile] * pp if isinstance(profile, LayerProfile) else list(profile)
        distances = [
            reload_distances_for_link(
                ops, profiles[r], link, timing=timing.ranks[r], drop_unhidden=drop_unhidden
            )
            for r, ops in enumerate(candidates.ranks)
        ]
    else:
        distances = (
            reload_distance
            if isinstance(reload_distance, (list, tuple))
            else [reload_distance] * pp
        )
    expanded = expand_schedule(schedule, layers_per_chunk, streamed, offloaded, list(distances))
    simulation = simulate_layer_schedule(expanded, profile, link, p2p_latency=p2p_latency)
    return LayerPlan(expanded=expanded, simulation=simulation, baseline=baseline, streamed=streamed,
                     offloaded=offloaded, distances=list(distances))


def unit_equivalents(sim: LayerSimulation | LayerScheduleSimulation, profile: LayerProfile,
                     chunk: int = 0):
    """Peak bytes divided by one whole unit's bytes of ``chunk`` (to compare with unit peaks)."""
    unit = profile.unit_bytes(chunk) or 1.0
    if isinstance(sim, LayerSimulation):
        return sim.peak_bytes / unit
    return [r.peak_bytes / unit for r in sim.ranks]


__all__ = ["LayerPlan", "LayerSimulation", "LayerScheduleSimulation", "plan_layer_streaming",
           "simulate_layers", "simulate_layer_schedule", "unit_equivalents"]
