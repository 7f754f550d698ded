"""Offload granularity: scoring layer streaming (``--offload-granularity layer``).

:class:`LayerSearch` extends the unit search with layer-granularity scores: every transformer
layer's saved activations are a sub-unit of their own
(:func:`schedule.layer_sim.plan_layer_streaming`: the cost model's bytes per layer, per-layer times
from the FLOPs, the host link's GB/s, reloads as late as the link allows, copies it cannot hide
dropped), simulated on a short schedule with the job's peaks. :meth:`LayerSearch.choose_granularity`
decides between the unit plan and layer streaming (the rule:
:func:`megatron_offload.planning.search.plan_job`, "Granularity"); :func:`score_layer_granularity`
scores one combination of a plan.
"""
from __future__ import annotations

import math

from megatron_offload.planning.candidates import (
    TOLERANCE,
    Candidate,
    LayerScore,
    Setting,
    streams_layers,
)
from megatron_offload.planning.costmodel import (
    DEFAULT_MIN_OFFLOAD_BYTES,
    GiB,
    layer_terms,
    split_bytes,
    unit_bytes,
)
from megatron_offload.planning.job import JobSpec
from megatron_offload.planning.plan import Plan
from megatron_offload.planning.unit_search import UnitSearch
from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.ir import Schedule
from megatron_offload.schedule.kinds import OpKind
from megatron_offload.schedule.layer_sim import plan_layer_streaming
from megatron_offload.schedule.layers import LayerProfile, LinkModel, stream_sets
from megatron_offload.schedule.memory import byte_peaks
from megatron_offload.schedule.simulate import simulate

DEFAULT_LAYER_SLOWDOWN_TOLERANCE = 0.01
"""Layer streaming is chosen only when its predicted iteration time is at most 1% above the
same schedule without copies (and above the unit-granularity plan it replaces)."""

LAYER_SCORES_PER_PLAN = 3
"""Layer-streaming simulations one :func:`~megatron_offload.planning.search.plan_job` may run
(each costs 0.1-0.4 s on the 70B / 175B examples): the chosen plan's, then faster combinations
that fit only with streaming."""


def _host_peak(sim, profile: LayerProfile) -> float:
    """Peak pinned host bytes of one rank's layer simulation: a copy holds host memory from
    the start of its offload to the end of its reload (releases first at equal times)."""
    events = []
    for op, begin, end in zip(sim.ops, sim.start, sim.end):
        if op.kind is OpKind.OFFLOAD:
            events.append((begin, profile.sub_unit_bytes(op.chunk, op.layer, op.microbatch)))
        elif op.kind is OpKind.RELOAD:
            events.append((end, -profile.sub_unit_bytes(op.chunk, op.layer, op.microbatch)))
    level = peak = 0.0
    for _, delta in sorted(events):
        level += delta
        peak = max(peak, level)
    return peak


class LayerSearch(UnitSearch):
    """:class:`UnitSearch` with layer-streaming scores: at most ``layer_scores`` layer
    simulations (:attr:`layer_runs` counts them), a layer plan within ``layer_tolerance`` of
    the iteration time without copies."""

    def __init__(self, job, hardware, budget_bytes, host_budget_node, min_offload_bytes,
                 calibration, layer_tolerance: float = DEFAULT_LAYER_SLOWDOWN_TOLERANCE,
                 layer_scores: int = LAYER_SCORES_PER_PLAN):
        super().__init__(job, hardware, budget_bytes, host_budget_node, min_offload_bytes,
                         calibration)
        self.layer_tolerance = layer_tolerance
        self.layer_budget = layer_scores
        self.layer_scores: dict[tuple, LayerScore | None] = {}
        self.layer_runs = 0
        self._profiles: dict[tuple, list[LayerProfile]] = {}
        self._proxies: dict[tuple, tuple[int, Schedule]] = {}

    def layer_profiles(self, setting: Setting, microbatches: int) -> list[LayerProfile]:
        """Per rank, the cost model's bytes per transformer layer and the rest of a unit
        (embedding / loss terms, per-unit terms, received input: the unit's bytes minus its
        layers', so a whole unit weighs what the unit search counts), scaled like the unit's
        bytes when measured ones calibrate them; per-layer times from the FLOPs and the
        achieved rate (the unit's forward / backward over its layers; embedding and loss
        compute are not modelled, as in the unit search). Copies move the ``offloadable`` part
        (tensors of at least ``min_offload_bytes``); the rest stays."""
        key = (setting.recompute, microbatches)
        if key in self._profiles:
            return self._profiles[key]
        job, L, v = self.job, self.job.layers_per_chunk, self.job.vpp
        layer = split_bytes(layer_terms(job, setting.recompute), self.min_offload_bytes)
        forward = ((setting.forward_s / L,) * L,) * v
        backward = ((setting.backward_s / L,) * L,) * v
        profiles = []
        for rank in range(job.pp):
            rest, layers, moved = [], [], {}
            for chunk in range(v):
                unit = setting.units[rank][chunk]
                raw = (unit_bytes(job, rank, chunk, setting.recompute, self.min_offload_bytes).total
                       if self.calibration else 0)
                factor = unit.total / raw if self.calibration and raw else 1.0
                total, movable = layer.total * factor, layer.offloadable * factor
                rest_total = max(0.0, unit.total - L * total)
                rest_moved = min(rest_total, max(0.0, unit.offloadable - L * movable))
                rest.append(rest_total)
                layers.append((total,) * L)
                for mb in range(microbatches):
                    moved[(chunk, mb, None)] = rest_moved
                    for index in range(L):
                        moved[(chunk, mb, index)] = movable
            profiles.append(LayerProfile(rest_bytes=tuple(rest), layer_bytes=tuple(layers),
                                         forward_time=forward, backward_time=backward,
                                         moved_bytes=moved))
        self._profiles[key] = profiles
        return profiles

    def proxy(self, kind, group, setting: Setting, chunks: int) -> tuple[int, Schedule]:
        """The schedule to simulate at layer granularity: the same family and group size with
        the fewest microbatches (rank 0's warm-up and a round of steady state, in whole groups,
        doubled until it matches) that reproduce, on every rank, the job's
        peak without offload and its peak with every unit of chunks < ``chunks`` away for its
        whole life (what streaming tends to: the peak then sits where the other chunks pile
        up, possibly later in the steady state); else the job's own schedule. The layer
        simulator costs ~10 us per entry: 192 microbatches on 16 ranks would take seconds."""
        key = (kind, group, setting.recompute, chunks)
        if key in self._proxies:
            return self._proxies[key]
        job = self.job
        m = job.microbatches
        full = self.schedule(kind, group)
        weights = [[[u.total for u in row] for row in setting.units]]
        if chunks:
            weights.append([[u.kept if c < chunks else u.total for c, u in enumerate(row)]
                            for row in setting.units])

        def peaks(schedule, sim=None):
            sim = sim or simulate(schedule, setting.costs)
            return [byte_peaks(sim, w)[0] for w in weights]

        want = peaks(full, self.base(kind, group, setting).simulation)
        step = group or job.pp
        # Rank 0's warm-up (Megatron's: the longer one) plus a round of v g forwards of steady
        # state, in whole groups, at least two groups.
        warmup = (job.vpp - 1) * step + 2 * (job.pp - 1) + 1
        count = max(2, math.ceil((warmup + job.vpp * step) / (job.vpp * step))) * step
        result = (m, full)
        while count < m:
            try:
                schedule = make_schedule(kind, job.pp, job.vpp, count,
                                         group if kind != "1f1b" else None)
            except ValueError:
                count += step
                continue
            got = peaks(schedule)
            if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1.0)
                   for x, y in zip(got, want) for a, b in zip(x, y)):
                result = (count, schedule)
                break
            count *= 2
        self._proxies[key] = result
        return result

    def layer_score(self, kind, group, setting: Setting, chunks: int) -> LayerScore | None:
        """Score (kind, group, setting) at layer granularity with units of chunks < ``chunks``
        streaming (cached). None when the layers do not stream (full recomputation) or the
        per-plan number of layer simulations is spent."""
        key = (kind, group, setting.recompute, chunks)
        if key in self.layer_scores:
            return self.layer_scores[key]
        if not streams_layers(self.job, setting) or self.layer_runs >= self.layer_budget:
            return None
        self.layer_runs += 1
        job = self.job
        microbatches, schedule = self.proxy(kind, group, setting, chunks)
        profiles = self.layer_profiles(setting, microbatches)
        link = LinkModel(d2h_bytes_per_time=self.hardware.link_bytes_per_s)
        result = plan_layer_streaming(schedule, job.layers_per_chunk, profiles, link, chunks=chunks,
                                      reload_distance="auto", drop_unhidden=True)
        sims = result.simulation.ranks
        if microbatches < job.microbatches:
            # Copies the D2H lane cannot drain within the rank's compute pile up over a long
            # iteration: the short schedule would understate the peak; simulate the job's own.
            saturated = any(sum(e - b for op, b, e in zip(r.ops, r.start, r.end)
                                if op.kind is OpKind.OFFLOAD) > 0.9 * r.busy
                            for r in sims)
            if saturated:
                microbatches, schedule = job.microbatches, self.schedule(kind, group)
                profiles = self.layer_profiles(setting, microbatches)
                result = plan_layer_streaming(schedule, job.layers_per_chunk, profiles, link,
                                              chunks=chunks, reload_distance="auto",
                                              drop_unhidden=True)
                sims = result.simulation.ranks
        activation = list(result.simulation.peak_bytes)
        memory = [st.total + w + a for st, w, a in zip(setting.static, setting.working, activation)]
        host = [_host_peak(r, profiles[rank]) for rank, r in enumerate(sims)]
        host_node = max(host) * self.hardware.gpus_per_node if host else 0.0
        full = self.schedule(kind, group)
        sets = [stream_sets(ops, chunks) if chunks else (set(), set()) for ops in full.ranks]
        base = self.base(kind, group, setting)
        score = LayerScore(
            chunks=chunks, activation_bytes=activation, memory_bytes=memory, host_bytes=host,
            host_bytes_per_node=host_node, slowdown=result.slowdown,
            makespan=base.makespan * (1.0 + result.slowdown),
            streamed_units=[len(streamed) for streamed, _ in sets],
            offloaded_units=[len(gone) for _, gone in sets],
            copies=list(result.simulation.copies), stall_s=list(result.simulation.stall),
            simulated_microbatches=microbatches,
            gpu_fits=max(memory) <= self.budget, host_fits=host_node <= self.host_budget)
        self.layer_scores[key] = score
        return score

    def choose_granularity(self, best: Candidate | None, shapes, settings: list[Setting],
                           refine: bool = True) -> tuple[Candidate | None, str, str]:
        """(plan, granularity, reason); see :func:`megatron_offload.planning.search.plan_job`."""
        tol = self.layer_tolerance
        reason = ""
        granularity = "unit"
        if best is not None and best.offload_chunks > 0 and refine:
            score = self.layer_score(best.kind, best.group_size, best.setting, best.offload_chunks)
            if score is None:
                reason = ("unit: layers under full recomputation keep only their checkpoint "
                          "inputs, nothing to stream"
                          if not streams_layers(self.job, best.setting)
                          else "unit: layer streaming not scored")
            else:
                best.layer = score
                worst_unit, worst_layer = max(best.memory_bytes), max(score.memory_bytes)
                if not score.gpu_fits:
                    reason = (f"unit: layer streaming does not fit ({worst_layer / GiB:.2f} GiB on "
                              "the worst rank)")
                elif not score.host_fits:
                    reason = (f"unit: layer streaming needs {score.host_bytes_per_node / GiB:.1f} "
                              "GiB of pinned host memory per node, over the host budget")
                elif score.slowdown > tol or score.makespan > best.makespan * (1 + tol):
                    reason = ("unit: layer streaming would slow the iteration by "
                              f"{score.slowdown:+.2%} (the host link cannot hide the per-layer "
                              f"copies; tolerance {tol:.1%})")
                elif worst_layer >= worst_unit - 2**20:
                    reason = ("unit: layer streaming does not lower the worst rank's memory ("
                              f"{worst_layer / GiB:.2f} GiB vs {worst_unit / GiB:.2f} GiB)")
                else:
                    granularity = "layer"
                    reason = (f"layer: lowers the worst rank's memory from {worst_unit / GiB:.2f} "
                              f"to {worst_layer / GiB:.2f} GiB at {score.slowdown:+.2%}, "
                              f"with the same offload chunks (K = {best.offload_chunks})")
        # Faster combinations (or any, when nothing fits) that fit only with layer streaming.
        limit = (math.inf if best is None
                 else best.layer.makespan if granularity == "layer" else best.makespan)
        pairs = []
        floor: dict[tuple, float] = {}  # a shape's makespan only grows up the recompute ladder
        for setting in settings:
            for kind, group in shapes:
                if floor.get((kind, group), 0.0) >= limit * (1 - TOLERANCE):
                    continue
                base = self.base(kind, group, setting)
                floor[(kind, group)] = base.makespan
                if best is not None and ((kind, group, setting.recompute)
                                         == (best.kind, best.group_size, best.setting.recompute)):
                    continue
                if base.makespan < limit * (1 - TOLERANCE) and streams_layers(self.job, setting):
                    pairs.append((base.makespan, base.sort_key(), kind, group, setting))
        pairs.sort(key=lambda item: item[:2])
        tried = []
        for _makespan, _, kind, group, setting in pairs:
            if self.layer_runs >= self.layer_budget:
                break
            score = self.layer_score(kind, group, setting, self.job.vpp)
            if score is None:
                continue
            if not score.fits or score.slowdown > tol or score.makespan >= limit * (1 - TOLERANCE):
                tried.append(f"{kind}{'' if group is None else f' g={group}'} recompute "
                             f"{setting.recompute.label}: "
                             + (f"{max(score.memory_bytes) / GiB:.2f} GiB on the worst rank"
                                if not score.gpu_fits
                                else "host memory over budget" if not score.host_fits
                                else f"{score.slowdown:+.2%} slower"))
                continue
            candidate = self.unit_at(kind, group, setting, self.job.vpp)
            candidate.layer = score
            why = ("nothing fits at unit granularity" if best is None
                   else f"faster than the {granularity} plan ({best.label()}, {limit:.3f} s)")
            return candidate, "layer", (
                f"layer: {candidate.kind}"
                f"{'' if candidate.group_size is None else f' g={candidate.group_size}'}"
                f", recompute {setting.recompute.label} fits only with layer streaming "
                f"({max(score.memory_bytes) / GiB:.2f} GiB on the worst rank, "
                f"{score.slowdown:+.2%}): {why}")
        what = "a faster combination" if best is not None else "the job"
        if granularity == "layer":
            # Fewer streamed chunks (less host memory and link traffic) if they meet the same rule.
            worst_unit = max(best.memory_bytes)
            while best.layer.chunks > 1 and self.layer_runs < self.layer_budget:
                fewer = self.layer_score(best.kind, best.group_size, best.setting,
                                         best.layer.chunks - 1)
                if (fewer is None or not fewer.fits or fewer.slowdown > tol
                        or fewer.makespan > best.makespan * (1 + tol)
                        or max(fewer.memory_bytes) >= worst_unit - 2**20):
                    break
                best.layer = fewer
                reason = (f"layer: lowers the worst rank's memory from {worst_unit / GiB:.2f} to "
                          f"{max(fewer.memory_bytes) / GiB:.2f} GiB at {fewer.slowdown:+.2%}, "
                          f"streaming fewer chunks (K = {fewer.chunks}) than the unit plan "
                          f"offloads (K = {best.offload_chunks})")
            return best, "layer", reason
        if tried:
            reason = (reason + "; " if reason else "unit: ") + (
                f"layer streaming of every chunk does not make {what} fit ({'; '.join(tried)})")
        elif not reason:
            reason = ("unit: no offload needed"
                      if best is not None and best.offload_chunks == 0 and not pairs
                      else "unit: the plan offloads nothing"
                      if best is not None and best.offload_chunks == 0
                      else "unit: layer streaming does not make the job fit either")
        return best, "unit", reason


def score_layer_granularity(plan: Plan, chunks: int | None = None, *,
                            candidate: Candidate | None = None,
                            shape: tuple[str, int | None] | None = None,
                            min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
                            full_schedule: bool = False) -> LayerScore | None:
    """``candidate``'s combination (default the plan's; ``shape`` = (kind, group size)
    replaces its schedule) scored at layer granularity with the units of chunks < ``chunks``
    streaming (default its offload chunks; 0 = nothing streams, which must reproduce the unit
    peaks without offload), against ``plan``'s budgets, from cost-model bytes (no
    calibration). ``full_schedule``: simulate the job's own microbatches instead of the short
    schedule. None under full recomputation."""
    candidate = candidate or plan.chosen or plan.baseline
    search = LayerSearch(plan.job, plan.hardware, plan.budget_bytes,
                         plan.host_budget_bytes_per_node, min_offload_bytes, None, layer_scores=1)
    setting = search.setting(candidate.setting.recompute, candidate.setting.level)
    kind, group = shape or (candidate.kind, candidate.group_size)
    chunks = candidate.offload_chunks if chunks is None else chunks
    if full_schedule:
        search._proxies[(kind, group, setting.recompute, chunks)] = (plan.job.microbatches,
                                                                     search.schedule(kind, group))
    return search.layer_score(kind, group, setting, chunks)


def layer_floor(job: JobSpec, setting: Setting, min_offload_bytes: int) -> list[float]:
    """Per rank, a lower bound on what a layer-streaming plan holds: static state, working
    memory and one layer's saved activations (or the rank's smallest unit, if smaller)."""
    if not streams_layers(job, setting):
        return setting.floor
    layer = split_bytes(layer_terms(job, setting.recompute), min_offload_bytes).total
    return [s.total + w + min(layer, min(u.total for u in row))
            for s, w, row in zip(setting.static, setting.working, setting.units)]
