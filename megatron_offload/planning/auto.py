"""Policy auto: the fewest units that keep a rank within an activation budget.

One selection, used by the runtime (``--offload-policy auto``, at the first training call:
:mod:`megatron_offload.integration.auto`) and by ``megatron-offload plan`` (its "policy auto"
line, through :func:`megatron_offload.planning.search.auto_for_plan`):
:func:`choose_offload_units` for one rank's fixed order, :func:`plan_auto_offload` for every
pipeline rank of a job. It needs only the cost model's bytes and the runtime's op IR, not the
planner's search.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_offload.planning.costmodel import (
    DEFAULT_MIN_OFFLOAD_BYTES,
    GiB,
    UnitBytes,
    unit_bytes,
)
from megatron_offload.planning.job import JobSpec, Recompute
from megatron_offload.schedule.kinds import OpKind
from megatron_offload.schedule.layers import runtime_rank_ops


@dataclass(kw_only=True, slots=True)
class RankOffloadChoice:
    """What policy ``auto`` offloads on one pipeline rank, and the peaks it predicts.

    Peaks are resident activation bytes at the runtime's sampling points (after each forward,
    before its offload; before each backward, after the reloads issued ahead of it), walked on
    the runtime's own op IR (:func:`schedule.layers.runtime_rank_ops`), plus ``overhead_bytes``."""

    rank: int
    offload: frozenset
    """The (chunk, microbatch) units to offload: what the runtime gets as its offload set."""
    units: int
    """Units (forwards) in this rank's order."""
    candidates: int
    """Units whose offload can free memory at some sampling point (lifespan > prefetch
    distance, some bytes large enough to move)."""
    budget_bytes: float
    peak_bytes: float
    """Predicted peak with :attr:`offload`."""
    peak_without_bytes: float
    """Predicted peak without offload."""
    floor_bytes: float
    """Predicted peak with every candidate offloaded: no offload set does better."""
    overhead_bytes: float = 0.0
    """Included in every peak: bytes the runtime counts besides the units' own (p2p buffers)."""

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    @property
    def missing_bytes(self) -> float:
        return max(0.0, self.peak_bytes - self.budget_bytes)

    def per_chunk(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for chunk, _ in self.offload:
            counts[chunk] = counts.get(chunk, 0) + 1
        return dict(sorted(counts.items()))

    def as_dict(self) -> dict:
        return {"rank": self.rank, "offload": sorted(self.offload), "units": self.units,
                "candidates": self.candidates, "budget_bytes": self.budget_bytes,
                "peak_bytes": self.peak_bytes, "peak_without_bytes": self.peak_without_bytes,
                "floor_bytes": self.floor_bytes, "overhead_bytes": self.overhead_bytes,
                "fits": self.fits, "per_chunk": self.per_chunk()}


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < GiB else f"{nbytes / GiB:.2f} GiB"


def _compute_positions(order) -> tuple[list, dict, dict]:
    compute = [op for op in order if op.kind in (OpKind.FORWARD, OpKind.BACKWARD)]
    forward_at, backward_at = {}, {}
    for position, op in enumerate(compute):
        (forward_at if op.kind is OpKind.FORWARD else backward_at)[op.unit] = position
    return compute, forward_at, backward_at


def resident_peak(ops, units: Sequence[UnitBytes], overhead_bytes: float = 0.0) -> float:
    """Peak resident activation bytes of one rank's runtime op list (F, B, O, R: what
    :func:`schedule.layers.runtime_rank_ops` returns), sampled where the runtime measures: after
    each forward (before its offload) and before each backward (after the reloads before it). A
    forward adds its unit's ``total`` bytes, an offload removes the ``offloadable`` part, a
    reload brings it back, a backward frees the unit after its sample. ``units[c]``: bytes of
    one unit of model chunk c on this rank."""
    level, peak = 0.0, 0.0
    for op in ops:
        unit = units[op.chunk]
        if op.kind is OpKind.FORWARD:
            level += unit.total
            peak = max(peak, level)
        elif op.kind is OpKind.OFFLOAD:
            level -= unit.offloadable
        elif op.kind is OpKind.RELOAD:
            level += unit.offloadable
        else:
            peak = max(peak, level)
            level -= unit.total
    return peak + overhead_bytes


def choose_offload_units(order, units: Sequence[UnitBytes], budget_bytes: float, *,
                         prefetch_distance: int = 1, overhead_bytes: float = 0.0,
                         rank: int = 0) -> RankOffloadChoice:
    """The fewest units of one rank's fixed op ``order`` to offload so that the resident peak
    (:func:`resident_peak` of the runtime's op IR, plus ``overhead_bytes``) stays within
    ``budget_bytes``; longest-lived first.

    A unit offloaded right after its forward and reloaded ``prefetch_distance`` compute ops
    before its backward is away (holds only its small, kept tensors) at the sampling points of
    the compute ops strictly between its forward and the op its reload precedes; a unit whose
    lifespan is not longer than the prefetch distance frees nothing and is never chosen.

    Sweep over the sampling points in order; wherever the level is over budget, offload the
    unit away there whose backward comes last (the longest-lived: in Megatron's interleaved
    schedule chunk 0 before chunk 1, earlier microbatches first), until it fits. With equal
    unit bytes this is the fewest units (covering points on a line with intervals, choosing the
    one reaching furthest is optimal); with unequal ones (first and last stage extras) it is a
    greedy. When even every candidate together is not enough, :attr:`fits` is False and the
    choice holds every unit that helps at the points over budget.
    """
    if prefetch_distance < 1:
        raise ValueError(f"--offload-prefetch {prefetch_distance} must be >= 1")
    compute, forward_at, backward_at = _compute_positions(order)
    n = len(compute)
    base = [0.0] * (n + 1)
    for unit, start in forward_at.items():
        total = units[unit[0]].total
        base[start] += total
        base[backward_at[unit] + 1] -= total
    starts: list[list] = [[] for _ in range(n)]
    candidates = []
    for unit, start in forward_at.items():
        # away at samples first..last
        first, last = start + 1, backward_at[unit] - prefetch_distance - 1
        moved = units[unit[0]].offloadable
        if first <= last and moved > 0:
            starts[first].append(unit)
            candidates.append(unit)
    away_until = {unit: backward_at[unit] - prefetch_distance - 1 for unit in candidates}

    chosen: set = set()
    heap: list = []
    ends = [0.0] * (n + 1)
    level = reduction = 0.0
    for q in range(n):
        level += base[q]
        reduction -= ends[q]
        for unit in starts[q]:
            last = away_until[unit]
            heapq.heappush(heap, (-last, -units[unit[0]].offloadable, unit[0], unit[1]))
        while level - reduction + overhead_bytes > budget_bytes and heap:
            neg_last, _, chunk, microbatch = heapq.heappop(heap)
            if -neg_last < q:  # its reload came before this point: no later one helps either
                heap.clear()
                break
            moved = units[chunk].offloadable
            chosen.add((chunk, microbatch))
            reduction += moved
            ends[-neg_last + 1] += moved

    # Without offload and with every candidate offloaded, from the same intervals (the tests
    # check them against the IR walk); the chosen set's peak is walked on the runtime's IR.
    without = floor = 0.0
    level = 0.0
    away = [0.0] * (n + 1)
    for unit in candidates:
        moved = units[unit[0]].offloadable
        away[forward_at[unit] + 1] += moved
        away[away_until[unit] + 1] -= moved
    gone = 0.0
    for q in range(n):
        level += base[q]
        gone += away[q]
        without = max(without, level)
        floor = max(floor, level - gone)
    offload = frozenset(chosen)
    return RankOffloadChoice(
        rank=rank, offload=offload, units=len(forward_at), candidates=len(candidates),
        budget_bytes=budget_bytes,
        peak_bytes=resident_peak(runtime_rank_ops(order, set(offload), prefetch_distance), units,
                                 overhead_bytes),
        peak_without_bytes=without + overhead_bytes, floor_bytes=floor + overhead_bytes,
        overhead_bytes=overhead_bytes,
    )


@dataclass(kw_only=True, slots=True)
class AutoOffloadPlan:
    """Policy ``auto`` for every pipeline rank of one job (each rank computes all of them, so
    that every rank takes the same decision to run or to refuse, without a collective)."""

    budget_bytes: float
    """The activation budget (with a per-rank budget: the smallest)."""
    ranks: list[RankOffloadChoice]
    unit_bytes: list[list[UnitBytes]]
    """Per rank, per chunk: the cost model's bytes of one unit."""
    job: JobSpec | None = None
    prefetch_distance: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(choice.fits for choice in self.ranks)

    @property
    def least_budget_bytes(self) -> float:
        """The smallest budget under which every rank fits: full offload's worst peak."""
        return max(choice.floor_bytes for choice in self.ranks)

    def rank_line(self, choice: RankOffloadChoice) -> str:
        chunks = ", ".join(f"chunk {c}: {k}" for c, k in choice.per_chunk().items())
        relation = "<=" if choice.fits else ">"
        return (f"rank {choice.rank} offloads {len(choice.offload)} of {choice.units} units"
                f"{f' ({chunks})' if chunks else ''}; predicted peak {_mib(choice.peak_bytes)} "
                f"{relation} budget {_mib(choice.budget_bytes)} (without offload "
                f"{_mib(choice.peak_without_bytes)})")

    def log_lines(self) -> list[str]:
        """Megatron-style log lines: one per pipeline rank."""
        return [f"> megatron-offload auto plan: {self.rank_line(choice)}" for choice in self.ranks]

    def does_not_fit_message(self) -> str:
        worst = max(self.ranks, key=lambda c: c.floor_bytes - c.budget_bytes)
        missing = worst.floor_bytes - worst.budget_bytes
        least = max(self.budget_bytes + c.floor_bytes - c.budget_bytes for c in self.ranks)
        uniform = all(c.budget_bytes == self.budget_bytes for c in self.ranks)
        text = ("--offload-memory-budget-gib too small: even with every unit offloaded, pipeline "
                f"rank {worst.rank} keeps {_mib(worst.floor_bytes)} of activations resident (the "
                "unit in its forward or backward, the one reloaded ahead, small tensors that stay, "
                f"p2p buffers) against an activation budget of {_mib(worst.budget_bytes)}: "
                f"{_mib(missing)} missing. Remedy: raise --offload-memory-budget-gib by at least "
                f"{_mib(least - self.budget_bytes)} (to {least / GiB:.4g} GiB"
                f"{'' if uniform else ' of activation budget'})")
        if self.job is not None:
            text += ("; or make each unit smaller: "
                     + "; ".join(_smaller_units(self.job, worst.rank)))
        return text


def _smaller_units(job: JobSpec, rank: int) -> list[str]:
    """Concrete changes that shrink the largest unit of ``rank``, with the bytes they give."""
    now = max(unit_bytes(job, rank, chunk).total for chunk in range(job.vpp))
    out = []
    if job.micro_batch_size > 1:
        half = job.micro_batch_size // 2
        smaller = job.with_changes(micro_batch_size=half, global_batch_size=None)
        out.append(f"--micro-batch-size {half} ("
                   f"{_mib(max(unit_bytes(smaller, rank, c).total for c in range(job.vpp)))} per "
                   f"unit instead of {_mib(now)})")
    if job.recompute.granularity != "full":
        full = Recompute(granularity="full", method="uniform", num_layers=1)
        try:
            bytes_full = max(unit_bytes(job, rank, c, full).total for c in range(job.vpp))
            out.append(f"{' '.join(full.megatron_flags())} ({_mib(bytes_full)} per unit)")
        except ValueError:
            pass
    if job.pp * 2 <= job.num_layers:
        out.append(f"--pipeline-model-parallel-size {job.pp * 2} (half the layers per unit)")
    return out or ["no smaller unit is possible with this model"]


def plan_auto_offload(job: JobSpec, orders, budget_bytes: float | Sequence[float], *,
                      prefetch_distance: int = 1,
                      min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
                      overhead_bytes: float | Sequence[float] = 0.0,
                      units: Sequence[Sequence[UnitBytes]] | None = None,
                      ranks: Sequence[int] | None = None) -> AutoOffloadPlan:
    """Policy ``auto`` for the pipeline ranks of ``job``: ``orders[r]`` is rank r's fixed op
    order (Megatron's), the bytes of a unit come from the cost model (``units[r][c]`` overrides
    them), ``overhead_bytes`` (one number, or one per rank) is added to every predicted peak;
    ``budget_bytes``: one activation budget, or one per rank. ``ranks`` restricts the plan to
    some ranks (default all)."""
    if units is None:
        units = [[unit_bytes(job, rank, chunk, job.recompute, min_offload_bytes)
                  for chunk in range(job.vpp)]
                 for rank in range(job.pp)]
    if isinstance(overhead_bytes, (int, float)):
        overhead_bytes = [float(overhead_bytes)] * job.pp
    budgets = ([float(budget_bytes)] * job.pp if isinstance(budget_bytes, (int, float))
               else list(budget_bytes))
    ranks = range(job.pp) if ranks is None else ranks
    choices = [choose_offload_units(orders[rank], units[rank], budgets[rank],
                                    prefetch_distance=prefetch_distance,
                                    overhead_bytes=overhead_bytes[rank], rank=rank)
               for rank in ranks]
    return AutoOffloadPlan(budget_bytes=min(budgets[rank] for rank in ranks), ranks=choices,
                           unit_bytes=[list(row) for row in units], job=job,
                           prefetch_distance=prefetch_distance)
