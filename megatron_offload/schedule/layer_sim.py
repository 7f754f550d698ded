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
from .simulate import _COMPUTE_RESIDENT, _D2H, _ROLE, _SharedLane, gc_paused

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


class _FifoLane:
    __slots__ = ("free",)

    def __init__(self) -> None:
        self.free = 0.0

    def place(self, ready: float, duration: float) -> float:
        begin = ready if ready > self.free else self.free
        self.free = begin + duration
        return begin


def _run(rank_ops: list[tuple[Op, ...]], profiles: list[LayerProfile], link: LinkModel | None, *,
         deps: tuple[int, int] | None, p2p_latency: float,
         ranks: list[int]) -> list[LayerSimulation]:
    count = len(rank_ops)
    for ops in rank_ops:
        check_rank(ops, strict=False)
    # Per rank: the compiled entries (kind, role, chunk, mb, layer, duration, transient, change,
    # ends_forward); the role (compute, compute needing its sub-unit resident, D2H or H2D copy)
    # comes from the kinds table, as in simulate.py.
    compiled = []
    for ops, profile in zip(rank_ops, profiles):
        ends = forward_ends(ops)
        table = []
        for index, op in enumerate(ops):
            try:
                transient, change = memory_effect(op.kind, op.chunk, op.layer, profile,
                                                  op.microbatch)
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
        compiled.append(table)

    shared = link is not None and link.shared and count > 1
    lane_ids = [link.lane_of(r) if link is not None else r for r in ranks]
    lane_type = _SharedLane if shared else _FifoLane
    d2h = {lane: lane_type() for lane in set(lane_ids)}
    h2d = {lane: lane_type() for lane in set(lane_ids)}

    # Per kind that sends: per rank, (chunk, mb) -> time the unit's output exists: a forward-pass
    # kind's after the epilogue (which follows the last layer), a backward-pass kind's after
    # its layer-0 entry.
    output_at = {kind: [{} for _ in range(count)] for kind in OpKind if kind.sends is not None}
    forward_done = output_at[OpKind.FORWARD]
    position = [0] * count
    clock = [0.0] * count
    seq = [0] * count
    events: list[list] = [[] for _ in range(count)]  # (time, phase, seq, what, value, index)
    start = [[0.0] * len(t) for t in compiled]
    end = [[0.0] * len(t) for t in compiled]
    issue = [[0.0] * len(t) for t in compiled]
    stall = [0.0] * count
    busy = [0.0] * count
    epilogues: list[list] = [[] for _ in range(count)]
    offload_end: list[dict] = [{} for _ in range(count)]
    reload_end: list[dict] = [{} for _ in range(count)]
    own_d2h, own_h2d = [0.0] * count, [0.0] * count
    sync = link is None
    pending = list(range(count))
    while pending:
        me = pending.pop()
        table, t, n = compiled[me], clock[me], seq[me]
        ev, my_start, my_end, my_issue = events[me], start[me], end[me], issue[me]
        step = position[me]
        begin_step = step
        profile = profiles[me]
        while step < len(table):
            kind, role, chunk, mb, layer, duration, transient, change, ends_forward = table[step]
            if role <= _COMPUTE_RESIDENT:
                ready = t
                if deps is not None and layer is None:
                    pp, vpp = deps
                    source = producer(ranks[me], kind, chunk, pp, vpp)
                    if source is not None:
                        done = output_at[kind][source[0]].get((source[1], mb))
                        if done is None:
                            break
                        done += p2p_latency
                        if done > ready:
                            ready = done
                if role == _COMPUTE_RESIDENT:
                    back = reload_end[me].get((chunk, mb, layer))
                    if back is not None and back > ready:
                        stall[me] += back - ready
                        ready = back
                my_issue[step] = t
                my_start[step], my_end[step] = ready, ready + duration
                ev.append((ready, 1, n, _START, transient, step))
                # the transient includes what it keeps
                ev.append((ready + duration, 1, n + 1, _END, 0.0, step))
                ev.append((ready + duration, 1, n + 2, _DELTA, change, step))
                ev.append((ready + duration, 1, n + 3, _MARK, 0.0, step))
                n += 4
                t = ready + duration
                busy[me] += duration
                if layer == 0 and kind.sends is Flow.UPSTREAM:
                    output_at[kind][me][(chunk, mb)] = t
            elif role == _D2H:
                my_issue[step] = t
                if sync:
                    my_start[step] = my_end[step] = t
                    ev.append((t, 1, n, _DELTA, change, step))
                else:
                    begin = d2h[lane_ids[me]].place(max(t, own_d2h[me]), duration)
                    # one stream per rank and direction: its copies in order
                    own_d2h[me] = begin + duration
                    my_start[step], my_end[step] = begin, begin + duration
                    ev.append((begin + duration, 0, n, _DELTA, change, step))
                ev.append((t, 1, n + 1, _MARK, 0.0, step))
                n += 2
                offload_end[me][(chunk, mb, layer)] = my_end[step]
            else:  # H2D copy
                my_issue[step] = t
                if sync:
                    begin = t
                else:
                    ready = max(t, offload_end[me][(chunk, mb, layer)])
                    begin = h2d[lane_ids[me]].place(max(ready, own_h2d[me]), duration)
                    own_h2d[me] = begin + duration
                my_start[step], my_end[step] = begin, begin + duration
                ev.append((begin, 1 if begin == t else 0, n, _DELTA, change, step))
                ev.append((t, 1, n + 1, _MARK, 0.0, step))
                n += 2
                reload_end[me][(chunk, mb, layer)] = begin + duration
            if ends_forward:  # the epilogue, then the unit's output exists
                e_transient, e_change = memory_effect(EPILOGUE, chunk, None, profile, mb)
                e_time = profile.epilogue_duration(chunk)
                ev.append((t, 1, n, _START, e_transient, step))
                ev.append((t + e_time, 1, n + 1, _END, 0.0, step))
                ev.append((t + e_time, 1, n + 2, _DELTA, e_change, step))
                ev.append((t + e_time, 1, n + 3, _MARK, 0.0, step))
                n += 4
                epilogues[me].append((chunk, mb, t, t + e_time))
                busy[me] += e_time
                t += e_time
                forward_done[me][(chunk, mb)] = t
            step += 1
        position[me], clock[me], seq[me] = step, t, n
        if deps is not None and step != begin_step:
            for other in range(count):
                if other != me and position[other] < len(compiled[other]) and other not in pending:
                    pending.append(other)
    stuck = [ranks[r] for r in range(count) if position[r] < len(compiled[r])]
    if stuck:
        details = "; ".join(f"rank {ranks[r]} at step {position[r]} ({rank_ops[r][position[r]]})"
                            for r in range(count) if position[r] < len(compiled[r]))
        raise ValueError(f"the layer schedule deadlocks: {details}")

    results = []
    for me in range(count):
        ops = rank_ops[me]
        level = profiles[me].base_bytes
        transient = 0.0
        current = -1
        peak, peak_entry = level, -1
        level_after = [0.0] * len(ops)
        peak_in = [0.0] * len(ops)
        curve = [(0.0, level, level)]
        for time, _phase, _n, what, value, index in sorted(events[me]):
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
        copies = [i for i, op in enumerate(ops) if op.kind.lane is Lane.D2H]
        reloads = [i for i, op in enumerate(ops) if op.kind.lane is Lane.H2D]
        profile = profiles[me]
        results.append(LayerSimulation(
            rank=ranks[me], ops=ops, start=start[me], end=end[me], issue=issue[me],
            level_after=level_after, peak_in=peak_in, peak_bytes=peak, peak_entry=peak_entry,
            curve=curve, epilogues=epilogues[me], copies=len(copies),
            offloaded_bytes=sum(profile.sub_unit_bytes(ops[i].chunk, ops[i].layer,
                                                       ops[i].microbatch) for i in copies),
            reloaded_bytes=sum(profile.sub_unit_bytes(ops[i].chunk, ops[i].layer,
                                                      ops[i].microbatch) for i in reloads),
            stall=stall[me], busy=busy[me], finish=max([*end[me], clock[me]], default=0.0),
            link=link,
        ))
    return results


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
