"""Memory budget -> Plan: schedule, group size, what to offload, recompute fallback, predictions.

:func:`plan_job` searches, for one job (:class:`~megatron_offload.planning.costmodel.JobSpec`) on one kind
of hardware (:class:`~megatron_offload.planning.hardware.Hardware`):

- the schedule: Megatron's own (1F1B, or interleaved with its group size, default g = p) and
  generalized interleaving (GIS) with g in {ceil(p/2), ceil(2p/3), p} (v > 1 only: with one chunk
  per rank GIS is 1F1B);
- the recomputation: the job's own, then a ladder of cheaper-to-costlier additions (core_attn
  with unfused attention, layernorm, mlp; then full) as a fallback;
- the offload set: none, or units of model chunks < K for K = 1..v, each rank offloading only the
  longest-lived units it needs to meet the budget (:func:`schedule.offload.plan_offload` with a
  memory target; it keeps only copies the link can hide, so offload never slows compute in the
  model);
- the granularity: whole units, or layer streaming (``--offload-granularity layer``), scored
  with the layer simulator for the chosen plan and for faster combinations (see
  :func:`plan_job`, "Granularity").

Every candidate is scored with the simulator (makespan) and byte-weighted memory sweeps
(:mod:`schedule.memory`): per rank, static state (parameters, gradients, optimizer) + working
memory + the peak of saved activations, against the budget (GPU memory minus a reserve), and
host bytes per node (per-rank pinned bytes x GPUs per node) against the host budget. The plan is
the fastest candidate that fits; at equal time: less recomputation, fewer offloaded units,
Megatron's schedule before GIS, larger groups. When nothing fits, the plan says how many GiB are
missing on the worst rank and re-plans the job with changes (smaller micro batch, more pipeline
stages, recomputation if it was not allowed) to find the cheapest that fits.

Search cost is kept low by ordering: baselines (no offload) are simulated first and sorted by
makespan; offload never shortens a makespan, so once a candidate fits, combinations whose
baseline is slower are skipped.

Not modelled: embedding and output-layer compute in the pipeline timing (per-rank times are
uniform per chunk), data-parallel communication and the optimizer step (outside the pipeline
makespan), p2p latency.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from megatron_offload.planning.costmodel import (
    DEFAULT_MIN_OFFLOAD_BYTES,
    RECOMPUTE_MODULES,
    GiB,
    JobSpec,
    Recompute,
    StaticBytes,
    UnitBytes,
    layer_flops,
    layer_terms,
    offload_ratio,
    split_bytes,
    overhead_bytes,
    static_bytes,
    unit_bytes,
    working_bytes,
)
from megatron_offload.planning.hardware import Hardware, host_memory_from_proc
from megatron_offload.schedule.catalog import check_schedule_args, make_schedule
from megatron_offload.schedule.costs import CostModel
from megatron_offload.schedule.ir import OpKind, Schedule
from megatron_offload.schedule.layer_sim import plan_layer_streaming
from megatron_offload.schedule.layers import LayerProfile, LinkModel, stream_sets
from megatron_offload.schedule.memory import byte_peaks
from megatron_offload.schedule.offload import plan_offload
from megatron_offload.schedule.simulate import Simulation, simulate

Family = Literal["megatron", "gis"]
FAMILIES: tuple[str, ...] = ("megatron", "gis")

NORM_RECOMPUTE_FLOP_EQUIVALENT = 600
"""Recomputing a norm is memory-bound: it reads and writes ~2 T h d bytes. At the ~150 FLOP per
byte of an H100 (989 TFLOP/s over 6.7 TB/s) that costs about 600 FLOP-equivalents per element of
width h per token (bf16). Used so that ``--recompute-modules layernorm`` is not free."""

_TOLERANCE = 1e-6

Granularity = Literal["unit", "layer"]
GRANULARITIES: tuple[str, ...] = ("unit", "layer")

DEFAULT_LAYER_SLOWDOWN_TOLERANCE = 0.01
"""Layer streaming is chosen only when its predicted iteration time is at most 1% above the
same schedule without copies (and above the unit-granularity plan it replaces)."""

LAYER_SCORES_PER_PLAN = 3
"""Layer-streaming simulations one :func:`plan_job` may run (each costs 0.1-0.4 s on the 70B /
175B examples): the chosen plan's, then faster combinations that fit only with streaming."""


def default_reserve_gib(gpu_memory_gib: float) -> float:
    """GPU memory kept out of the budget: ~2 GiB of CUDA context, NCCL and cuBLAS workspaces,
    plus 5% for the caching allocator's fragmentation."""
    return 2.0 + 0.05 * gpu_memory_gib


# ---- inputs per recompute level ----------------------------------------------------------------

@dataclass(kw_only=True, slots=True)
class Setting:
    """Everything that depends on the recomputation: bytes per unit, times, k."""

    recompute: Recompute
    level: int
    """Position in the recompute ladder (0 = the job's own setting)."""
    units: list[list[UnitBytes]]
    """Per rank, per model chunk: bytes of one unit."""
    typical: UnitBytes
    """A unit of a middle stage (no embedding / loss tensors): what k is computed from."""
    static: list[StaticBytes]
    working: list[int]
    forward_s: float
    backward_s: float
    k: float
    costs: CostModel

    @property
    def floor(self) -> list[float]:
        """Per rank, the least any plan holds: static state, working memory and one unit (the
        one in its backward; the rank's smallest)."""
        return [s.total + w + min(u.total for u in row) for s, w, row in zip(self.static, self.working, self.units)]


def recompute_ladder(job: JobSpec) -> list[Recompute]:
    """The job's recomputation, then cumulatively cheaper-first additions (core_attn where
    attention is unfused, layernorm, mlp), then full recomputation of every layer.
    ``mlp`` is skipped with biased linears (megatron-core 0.16.1 recurses without end in
    CheckpointFunction.backward when the fc2 bias goes through the checkpoint)."""
    own = job.recompute
    if own.granularity == "full":
        return [own]
    ladder = [own]
    modules = list(own.modules) if own.granularity == "selective" else []
    steps = ([] if job.uses_flash else ["core_attn"]) + ["layernorm"] + ([] if job.add_bias_linear else ["mlp"])
    for step in steps:
        if step not in modules:
            modules.append(step)
        ordered = tuple(m for m in RECOMPUTE_MODULES if m in modules) + tuple(m for m in modules if m not in RECOMPUTE_MODULES)
        candidate = Recompute(granularity="selective", modules=ordered)
        if candidate not in ladder:
            ladder.append(candidate)
    ladder.append(Recompute(granularity="full", method="uniform", num_layers=1))
    return ladder


def _setting(job: JobSpec, hardware: Hardware, recompute: Recompute, level: int, min_offload_bytes: int,
             calibration: list[list[float]] | None) -> Setting:
    p, v = job.pp, job.vpp
    units = []
    for rank in range(p):
        row = []
        for chunk in range(v):
            unit = unit_bytes(job, rank, chunk, recompute, min_offload_bytes)
            if calibration is not None:
                factor = calibration[rank][chunk]
                unit = UnitBytes(total=int(unit.total * factor), offloadable=int(unit.offloadable * factor))
            row.append(unit)
        units.append(row)
    typical = unit_bytes(job, -1, -1, recompute, min_offload_bytes)
    if calibration is not None:
        middle = calibration[min(1, p - 1)][0]
        typical = UnitBytes(total=int(typical.total * middle), offloadable=int(typical.offloadable * middle))
    flops = layer_flops(job, recompute)
    norm_extra = 0.0
    if recompute.has("layernorm"):
        norm_extra = 2 * NORM_RECOMPUTE_FLOP_EQUIVALENT * job.tokens * job.sp_width
    rate = hardware.achieved_tflops * 1e12
    forward_s = job.layers_per_chunk * flops.forward / rate
    backward_s = job.layers_per_chunk * (flops.backward + norm_extra) / rate
    k = offload_ratio(typical.offloadable, forward_s + backward_s, hardware.host_link_gbps) if typical.offloadable else 0.0
    costs = CostModel(forward_time=forward_s, backward_time=backward_s, offload_ratio=k, offload_share=0.5)
    return Setting(recompute=recompute, level=level, units=units, typical=typical,
                   static=[static_bytes(job, r) for r in range(p)], working=[working_bytes(job, r, recompute) for r in range(p)],
                   forward_s=forward_s, backward_s=backward_s, k=k, costs=costs)


# ---- candidates -----------------------------------------------------------------------------------

@dataclass(kw_only=True, slots=True)
class LayerScore:
    """One (schedule, group size, recomputation) scored at layer granularity: every
    transformer layer's saved activations are a sub-unit of their own
    (:func:`schedule.layer_sim.plan_layer_streaming`, reloads as late as the host link
    allows, copies it cannot hide skipped). Units of model chunks < :attr:`chunks` stream; of
    those, units with a lifespan leave entirely, the others (last stage) stream all layers but
    the last: the runtime's rule for ``--offload-policy chunks --offload-chunks K
    --offload-granularity layer``. Byte lists are per pipeline rank."""

    chunks: int
    activation_bytes: list[float]
    """Peak saved-activation bytes on the device (the layer simulator's true peak)."""
    memory_bytes: list[float]
    """Static + working + :attr:`activation_bytes`."""
    host_bytes: list[float]
    """Peak pinned host bytes (from each copy's start to its reload's end)."""
    host_bytes_per_node: float
    slowdown: float
    """Makespan with the copies / the same layer-level order without them - 1."""
    makespan: float
    """Predicted iteration time: the unit simulation's time without offload x (1 + slowdown)."""
    streamed_units: list[int]
    """Per rank, units whose layers stream (in the job's full schedule)."""
    offloaded_units: list[int]
    """Per rank, units that leave the device entirely."""
    copies: list[int]
    """Per rank, D2H copies in the simulated iteration (:attr:`simulated_microbatches`)."""
    stall_s: list[float]
    simulated_microbatches: int
    """Microbatches of the simulated schedule: the job's, or fewer with the same peak without
    offload (the warm-up and a steady state; see :meth:`_Search.layer_score`)."""
    gpu_fits: bool
    host_fits: bool

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.host_fits


@dataclass(kw_only=True, slots=True)
class Candidate:
    """One scored (schedule, group size, recomputation, offload) combination."""

    kind: str
    """``1f1b``, ``interleaved`` or ``gis``."""
    group_size: int | None
    setting: Setting
    offload_chunks: int
    """K: offload candidates are units of model chunks < K (0 = no offload)."""
    schedule: Schedule
    """The schedule with its offload (O) and reload (R) ops: what the runtime should run."""
    simulation: Simulation
    offloaded: list[list[tuple[int, int]]]
    """Per rank, the (chunk, microbatch) units offloaded, longest-lived first."""
    activation_bytes: list[float]
    """Per rank: peak saved-activation bytes on the device."""
    memory_bytes: list[float]
    """Per rank: static + working + peak activations."""
    host_bytes: list[float]
    """Per rank: peak pinned host bytes."""
    host_bytes_per_node: float
    gpu_fits: bool
    host_fits: bool
    layer: LayerScore | None = None
    """The same combination at layer granularity, when the planner scored it."""

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.host_fits

    @property
    def family(self) -> str:
        return "gis" if self.kind == "gis" else "megatron"

    @property
    def makespan(self) -> float:
        return self.simulation.makespan

    @property
    def offloaded_count(self) -> int:
        return sum(len(units) for units in self.offloaded)

    def excess(self, budget_bytes: float) -> float:
        """Bytes over the GPU budget on the worst rank (<= 0 when it fits)."""
        return max(self.memory_bytes) - budget_bytes

    def label(self) -> str:
        group = f" g={self.group_size}" if self.kind != "1f1b" and self.group_size is not None else ""
        offload = "no offload" if self.offload_chunks == 0 else f"offload chunks<{self.offload_chunks} ({self.offloaded_count} units)"
        return f"{self.kind}{group}, recompute {self.setting.recompute.label}, {offload}"

    def sort_key(self) -> tuple:
        """Tie-breaks at equal makespan: less recomputation, fewer offloaded units, Megatron's
        schedule, larger groups."""
        return (self.setting.level, self.offloaded_count, 0 if self.family == "megatron" else 1, -(self.group_size or 0))


def _better(a: Candidate, b: Candidate | None) -> bool:
    if b is None:
        return True
    if not math.isclose(a.makespan, b.makespan, rel_tol=_TOLERANCE):
        return a.makespan < b.makespan
    return a.sort_key() < b.sort_key()


def schedule_shapes(job: JobSpec, families: Sequence[str] = FAMILIES) -> tuple[list[tuple[str, int | None]], list[str]]:
    """The (kind, group size) pairs to try, and why others were left out."""
    p, v, m = job.pp, job.vpp, job.microbatches
    shapes: list[tuple[str, int | None]] = []
    notes = []
    if "megatron" in families:
        kind = "interleaved" if v > 1 else "1f1b"
        group = job.microbatch_group_size_per_vp_stage if v > 1 else None
        try:
            g = check_schedule_args(kind, p, v, m, group)
            shapes.append((kind, g))
        except ValueError as error:
            notes.append(f"Megatron's {kind} schedule refuses this job: {error}")
    if "gis" in families and v > 1:
        for g in sorted({math.ceil(p / 2), math.ceil(2 * p / 3), p}, reverse=True):
            if 1 <= g <= m and ("gis", g) not in shapes:
                shapes.append(("gis", g))
    if "gis" in families and v == 1 and not shapes:
        shapes.append(("gis", min(p, m)))
    return shapes, notes


# ---- the plan --------------------------------------------------------------------------------------

@dataclass(kw_only=True, slots=True)
class Remedy:
    """A change to the job that makes it fit, with the plan that then fits."""

    change: str
    """Human-readable, e.g. "--micro-batch-size 1"."""
    flags: dict
    """Megatron-LM flag -> new value."""
    extra_gpus: int
    """GPUs the change needs beyond the job's (0 = same GPU count)."""
    plan: "Plan"


@dataclass(kw_only=True, slots=True)
class Plan:
    """The planner's answer for one job, hardware and budget. Byte lists are per pipeline rank."""

    job: JobSpec
    hardware: Hardware
    fits: bool
    chosen: Candidate | None
    """The plan's candidate (None only when no schedule could be built at all)."""
    baseline: Candidate
    """The job as given: Megatron's schedule, its own recomputation, no offload."""
    budget_bytes: float
    reserve_bytes: float
    host_budget_bytes_per_node: float
    host_memory_source: str
    missing_bytes: float
    """GPU bytes over the budget on the worst rank of the closest candidate (0 when it fits)."""
    missing_host_bytes_per_node: float
    remedy: Remedy | None
    remedies_tried: list[str]
    reasons: list[str]
    alternatives: list[Candidate]
    """Other scored candidates, best first (for the report)."""
    missing_is_lower_bound: bool = False
    """True when no candidate was scored because even the floor is over budget: then
    ``missing_bytes`` is floor - budget, the least that is missing."""
    floor_bytes: list[float] = field(default_factory=list)
    """Per rank, the least any searched plan can hold (static + working + one unit, at the
    recomputation that makes it smallest): below it nothing fits whatever is offloaded."""
    planning_s: float = 0.0
    evaluated: int = 0
    """Candidates scored (simulated and swept) by this search, remedies not counted."""
    notes: list[str] = field(default_factory=list)
    granularity: Granularity = "unit"
    """What moves as one piece in this plan (``--offload-granularity``): ``unit`` (a chunk's
    activations for one microbatch) or ``layer`` (each transformer layer's, streamed); the
    headline predictions (:attr:`activation_bytes`, :attr:`memory_bytes`, :attr:`slowdown`,
    host memory) are those of this granularity. See :func:`plan_job` for the rule."""
    granularity_reason: str = ""
    """Why this granularity (one sentence, also in :attr:`reasons`)."""
    layer_scores: int = 0
    """Layer-streaming simulations this search ran."""

    # -- what the runtime needs ------------------------------------------------------------------
    @property
    def schedule(self) -> Schedule | None:
        """The planned unit-level order with its whole-unit copies; at layer granularity the
        runtime refines its compute order into layer entries (``policy.runtime_plan``)."""
        return None if self.chosen is None else self.chosen.schedule

    @property
    def schedule_kind(self) -> str | None:
        return None if self.chosen is None else self.chosen.kind

    @property
    def group_size(self) -> int | None:
        return None if self.chosen is None else self.chosen.group_size

    @property
    def offload_chunks(self) -> int:
        if self.chosen is None:
            return 0
        return self.chosen.layer.chunks if self.granularity == "layer" else self.chosen.offload_chunks

    @property
    def layer(self) -> LayerScore | None:
        """The chosen candidate at layer granularity (None when not scored)."""
        return None if self.chosen is None else self.chosen.layer

    @property
    def activation_bytes(self) -> list[float]:
        """Per rank, the predicted peak of saved activations at the chosen granularity."""
        chosen = self.chosen or self.baseline
        return chosen.layer.activation_bytes if self.granularity == "layer" else chosen.activation_bytes

    @property
    def memory_bytes(self) -> list[float]:
        """Per rank, static + working + peak activations at the chosen granularity."""
        chosen = self.chosen or self.baseline
        return chosen.layer.memory_bytes if self.granularity == "layer" else chosen.memory_bytes

    @property
    def host_bytes(self) -> list[float]:
        chosen = self.chosen or self.baseline
        return chosen.layer.host_bytes if self.granularity == "layer" else chosen.host_bytes

    @property
    def host_bytes_per_node(self) -> float:
        chosen = self.chosen or self.baseline
        return chosen.layer.host_bytes_per_node if self.granularity == "layer" else chosen.host_bytes_per_node

    def granularity_peaks(self) -> dict[str, list[float] | None]:
        """Per rank peak activation bytes at each granularity: ``unit`` always; ``layer`` when
        scored, equal to ``unit`` when nothing streams (no offload, or full recomputation,
        whose layers keep only their checkpoint inputs), else None (not scored)."""
        chosen = self.chosen or self.baseline
        layer = None
        if chosen.layer is not None:
            layer = chosen.layer.activation_bytes
        elif chosen.offload_chunks == 0 or not _streams_layers(self.job, chosen.setting):
            layer = chosen.activation_bytes
        return {"unit": chosen.activation_bytes, "layer": layer}

    @property
    def offloaded_units(self) -> list[list[tuple[int, int]]]:
        """Per rank, the units :attr:`schedule` offloads whole (the unit plan's longest-lived
        selection). At layer granularity the runtime follows the rule instead (units of chunks
        < K stream, those with a lifespan leave entirely): counts in :attr:`layer`."""
        return [] if self.chosen is None else self.chosen.offloaded

    @property
    def recompute(self) -> Recompute:
        return self.job.recompute if self.chosen is None else self.chosen.setting.recompute

    @property
    def k(self) -> float:
        return (self.chosen or self.baseline).setting.k

    def label(self) -> str:
        """The chosen candidate in words, at the plan's granularity."""
        chosen = self.chosen or self.baseline
        if self.granularity != "layer":
            return chosen.label()
        shape = chosen.label().rsplit(", ", 1)[0]
        return f"{shape}, stream the layers of chunks<{chosen.layer.chunks} ({sum(chosen.layer.streamed_units)} units)"

    def offload_policy(self) -> tuple[str, int | None]:
        """The runtime's coarse equivalent: ("none", None), ("chunks", K) or ("full", None).
        The exact per-rank set is :attr:`offloaded_units`."""
        if self.offload_chunks == 0:
            return "none", None
        if self.offload_chunks == self.job.vpp:
            return "full", None
        return "chunks", self.offload_chunks

    # -- predictions ------------------------------------------------------------------------------
    @property
    def iteration_time_s(self) -> float:
        chosen = self.chosen or self.baseline
        return chosen.layer.makespan if self.granularity == "layer" else chosen.makespan

    @property
    def baseline_iteration_time_s(self) -> float:
        return self.baseline.makespan

    @property
    def slowdown(self) -> float:
        """Predicted iteration time / the job as given (Megatron's schedule, no offload) - 1."""
        return self.iteration_time_s / self.baseline_iteration_time_s - 1.0

    def to_json(self) -> dict:
        chosen = self.chosen or self.baseline
        gib = lambda values: [round(x / GiB, 3) for x in values]  # noqa: E731
        peaks = self.granularity_peaks()
        layer = chosen.layer
        slowdown = lambda makespan: round(makespan / self.baseline_iteration_time_s - 1.0, 5)  # noqa: E731
        # At layer granularity: the layer score; when nothing streams (peaks["layer"] is the
        # unit's), the unit plan's; when not scored, None.
        layer_memory = layer.memory_bytes if layer is not None else None if peaks["layer"] is None else chosen.memory_bytes
        layer_time = layer.makespan if layer is not None else None if peaks["layer"] is None else chosen.makespan
        return {
            "fits": self.fits,
            "k": round(chosen.setting.k, 4),
            "schedule": chosen.kind,
            "group_size": chosen.group_size,
            "offload_chunks": self.offload_chunks,
            "predicted_peak_activation_gib": gib(self.activation_bytes),
            "predicted_peak_memory_gib": gib(self.memory_bytes),
            "predicted_slowdown": round(self.slowdown, 5),
            "host_memory_gib_per_node": round(self.host_bytes_per_node / GiB, 3),
            # beyond architecture.md's keys
            "granularity": self.granularity,
            "granularity_reason": self.granularity_reason,
            "predicted_peak_activation_gib_unit": gib(peaks["unit"]),
            "predicted_peak_activation_gib_layer": None if peaks["layer"] is None else gib(peaks["layer"]),
            "predicted_peak_memory_gib_unit": gib(chosen.memory_bytes),
            "predicted_peak_memory_gib_layer": None if layer_memory is None else gib(layer_memory),
            "predicted_slowdown_unit": slowdown(chosen.makespan),
            "predicted_slowdown_layer": None if layer_time is None else slowdown(layer_time),
            "layer_streaming": None if layer is None else {
                "chunks": layer.chunks, "streamed_units_per_rank": layer.streamed_units,
                "offloaded_units_per_rank": layer.offloaded_units, "copies_per_rank_simulated": layer.copies,
                "stall_s_per_rank": [round(x, 6) for x in layer.stall_s], "slowdown_vs_no_copies": round(layer.slowdown, 5),
                "host_memory_gib_per_node": round(layer.host_bytes_per_node / GiB, 3),
                "simulated_microbatches": layer.simulated_microbatches, "fits": layer.fits,
            },
            "recompute": chosen.setting.recompute.label,
            "recompute_flags": chosen.setting.recompute.megatron_flags(),
            "offload_policy": list(self.offload_policy()),
            "offloaded_units_per_rank": (layer.offloaded_units if self.granularity == "layer"
                                         else [len(units) for units in chosen.offloaded]),
            "offloaded_units_fraction": round(chosen.simulation.offloaded_fraction, 4),
            "host_memory_gib_per_rank": gib(self.host_bytes),
            "predicted_peak_activation_gib_without": gib(self.baseline.activation_bytes),
            "predicted_peak_memory_gib_without": gib(self.baseline.memory_bytes),
            "static_memory_gib": gib([s.total for s in chosen.setting.static]),
            "working_memory_gib": gib(chosen.setting.working),
            "unit_gib": [[round(u.total / GiB, 4) for u in row] for row in chosen.setting.units],
            "iteration_time_s": round(self.iteration_time_s, 6),
            "baseline_iteration_time_s": round(self.baseline_iteration_time_s, 6),
            "forward_time_per_unit_s": chosen.setting.forward_s,
            "backward_time_per_unit_s": chosen.setting.backward_s,
            "budget_gib": round(self.budget_bytes / GiB, 3),
            "reserve_gib": round(self.reserve_bytes / GiB, 3),
            "host_budget_gib_per_node": round(self.host_budget_bytes_per_node / GiB, 3),
            "host_memory_source": self.host_memory_source,
            "missing_gib": round(self.missing_bytes / GiB, 3),
            "missing_is_lower_bound": self.missing_is_lower_bound,
            "floor_gib": gib(self.floor_bytes),
            "missing_host_gib_per_node": round(self.missing_host_bytes_per_node / GiB, 3),
            "remedy": None if self.remedy is None else {
                "change": self.remedy.change, "flags": self.remedy.flags, "extra_gpus": self.remedy.extra_gpus,
                "schedule": self.remedy.plan.schedule_kind, "group_size": self.remedy.plan.group_size,
                "offload_chunks": self.remedy.plan.offload_chunks, "recompute": self.remedy.plan.recompute.label,
                "iteration_time_s": round(self.remedy.plan.iteration_time_s, 6),
                "predicted_peak_memory_gib": gib((self.remedy.plan.chosen or self.remedy.plan.baseline).memory_bytes),
            },
            "remedies_tried": self.remedies_tried,
            "pp": self.job.pp, "vpp": self.job.vpp, "tp": self.job.tp, "cp": self.job.context_parallel_size,
            "dp": self.job.data_parallel_size, "microbatches": self.job.microbatches,
            "hardware": self.hardware.name,
            "reasons": self.reasons,
            "notes": self.notes,
            "planning_s": round(self.planning_s, 4),
            "candidates_evaluated": self.evaluated,
            "layer_scores": self.layer_scores,
        }


# ---- search -------------------------------------------------------------------------------------------

def _streams_layers(job: JobSpec, setting: Setting) -> bool:
    """Whether layer streaming differs from unit offload: not under full recomputation (its
    layers keep only their checkpoint inputs, which leave with the unit)."""
    return setting.recompute.granularity != "full" and job.layers_per_chunk > 0


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


class _Search:
    def __init__(self, job, hardware, budget_bytes, host_budget_node, min_offload_bytes, calibration,
                 layer_tolerance: float = DEFAULT_LAYER_SLOWDOWN_TOLERANCE, layer_scores: int = LAYER_SCORES_PER_PLAN):
        self.job, self.hardware = job, hardware
        self.budget, self.host_budget = budget_bytes, host_budget_node
        self.min_offload_bytes, self.calibration = min_offload_bytes, calibration
        self.schedules: dict[tuple[str, int | None], Schedule] = {}
        self.settings: dict[Recompute, Setting] = {}
        self.scored: list[Candidate] = []
        self.bases: dict[tuple, Candidate] = {}
        """(kind, group, recompute) -> the combination without offload, scored."""
        self.layer_tolerance = layer_tolerance
        self.layer_budget = layer_scores
        self.layer_scores: dict[tuple, LayerScore | None] = {}
        self.layer_runs = 0
        self._profiles: dict[tuple, list[LayerProfile]] = {}
        self._proxies: dict[tuple, tuple[int, Schedule]] = {}

    def setting(self, recompute: Recompute, level: int) -> Setting:
        if recompute not in self.settings:
            self.settings[recompute] = _setting(self.job, self.hardware, recompute, level, self.min_offload_bytes, self.calibration)
        return self.settings[recompute]

    def schedule(self, kind: str, group: int | None) -> Schedule:
        key = (kind, group)
        if key not in self.schedules:
            job = self.job
            self.schedules[key] = make_schedule(kind, job.pp, job.vpp, job.microbatches, group if kind != "1f1b" else None)
        return self.schedules[key]

    def score(self, kind, group, setting: Setting, sim: Simulation, chunks: int, offloaded) -> Candidate:
        totals = [[u.total for u in row] for row in setting.units]
        moved = [[u.offloadable for u in row] for row in setting.units]
        device, host = byte_peaks(sim, totals, moved)
        memory = [s.total + w + a for s, w, a in zip(setting.static, setting.working, device)]
        host_node = max(host) * self.hardware.gpus_per_node if host else 0.0
        candidate = Candidate(kind=kind, group_size=group, setting=setting, offload_chunks=chunks, schedule=sim.schedule,
                              simulation=sim, offloaded=offloaded, activation_bytes=device, memory_bytes=memory, host_bytes=host,
                              host_bytes_per_node=host_node, gpu_fits=max(memory) <= self.budget,
                              host_fits=host_node <= self.host_budget)
        self.scored.append(candidate)
        return candidate

    def target_units(self, setting: Setting, baseline: Candidate) -> list[int]:
        """Per rank, the resident units that fit the budget: what is left after static and
        working memory, the rank's largest stage extra (embedding / loss tensors of its first or
        last chunk) and the small tensors offloaded units leave behind, over a middle unit's bytes."""
        unit = max(setting.typical.total, 1)
        targets = []
        for rank, (static, working) in enumerate(zip(setting.static, setting.working)):
            extra = max(0, max(u.total for u in setting.units[rank]) - setting.typical.total)
            kept = setting.typical.kept * baseline.simulation.peak_units[rank]
            targets.append(max(0, int((self.budget - static.total - working - extra - kept) // unit)))
        return targets

    def run(self, shapes, settings: list[Setting]) -> tuple[Candidate | None, list[tuple]]:
        """Level by level of the recompute ladder (each level's backward is longer, so a shape's
        makespan only grows from one level to the next: a shape whose makespan at a lower level
        already reaches the best plan's is not simulated again); within a level, combinations by
        makespan, stopping at the first slower than the best plan."""
        combos = []
        best: Candidate | None = None
        floor: dict[tuple, float] = {}  # shape -> makespan at the last level simulated
        for setting in settings:
            level = []
            for kind, group in shapes:
                if best is not None and floor.get((kind, group), 0.0) >= best.makespan * (1 - _TOLERANCE):
                    continue
                base = simulate(self.schedule(kind, group), setting.costs)
                floor[(kind, group)] = base.makespan
                level.append((base.makespan, 0 if kind != "gis" else 1, -(group or 0), kind, group, setting, base))
            level.sort(key=lambda c: c[:3])
            combos += level
            for makespan, _, _, kind, group, setting, base in level:
                if best is not None and makespan > best.makespan * (1 + _TOLERANCE):
                    break
                candidate = self.score(kind, group, setting, base, 0, [[] for _ in range(self.job.pp)])
                self.bases[(kind, group, setting.recompute)] = candidate
                if candidate.fits:
                    if _better(candidate, best):
                        best = candidate
                    continue
                if best is not None and math.isclose(makespan, best.makespan, rel_tol=_TOLERANCE) and best.offloaded_count == 0:
                    continue  # an equally fast plan without offload exists
                candidate = self._offload_search(kind, group, setting, candidate)
                if candidate is not None and _better(candidate, best):
                    best = candidate
        return best, combos

    def base(self, kind, group, setting: Setting) -> Candidate:
        """The combination without offload, scored (cached)."""
        key = (kind, group, setting.recompute)
        if key not in self.bases:
            sim = simulate(self.schedule(kind, group), setting.costs)
            self.bases[key] = self.score(kind, group, setting, sim, 0, [[] for _ in range(self.job.pp)])
        return self.bases[key]

    # -- layer granularity ---------------------------------------------------------------------

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
                raw = unit_bytes(job, rank, chunk, setting.recompute, self.min_offload_bytes).total if self.calibration else 0
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
            profiles.append(LayerProfile(rest_bytes=tuple(rest), layer_bytes=tuple(layers), forward_time=forward,
                                         backward_time=backward, moved_bytes=moved))
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
            weights.append([[u.kept if c < chunks else u.total for c, u in enumerate(row)] for row in setting.units])

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
                schedule = make_schedule(kind, job.pp, job.vpp, count, group if kind != "1f1b" else None)
            except ValueError:
                count += step
                continue
            got = peaks(schedule)
            if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1.0) for x, y in zip(got, want) for a, b in zip(x, y)):
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
        if not _streams_layers(self.job, setting) or self.layer_runs >= self.layer_budget:
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
            saturated = any(sum(e - b for op, b, e in zip(r.ops, r.start, r.end) if op.kind is OpKind.OFFLOAD) > 0.9 * r.busy
                            for r in sims)
            if saturated:
                microbatches, schedule = job.microbatches, self.schedule(kind, group)
                profiles = self.layer_profiles(setting, microbatches)
                result = plan_layer_streaming(schedule, job.layers_per_chunk, profiles, link, chunks=chunks,
                                              reload_distance="auto", drop_unhidden=True)
                sims = result.simulation.ranks
        activation = list(result.simulation.peak_bytes)
        memory = [st.total + w + a for st, w, a in zip(setting.static, setting.working, activation)]
        host = [_host_peak(r, profiles[rank]) for rank, r in enumerate(sims)]
        host_node = max(host) * self.hardware.gpus_per_node if host else 0.0
        full = self.schedule(kind, group)
        sets = [stream_sets(ops, chunks) if chunks else (set(), set()) for ops in full.ranks]
        base = self.base(kind, group, setting)
        score = LayerScore(
            chunks=chunks, activation_bytes=activation, memory_bytes=memory, host_bytes=host, host_bytes_per_node=host_node,
            slowdown=result.slowdown, makespan=base.makespan * (1.0 + result.slowdown),
            streamed_units=[len(streamed) for streamed, _ in sets], offloaded_units=[len(gone) for _, gone in sets],
            copies=list(result.simulation.copies), stall_s=list(result.simulation.stall), simulated_microbatches=microbatches,
            gpu_fits=max(memory) <= self.budget, host_fits=host_node <= self.host_budget)
        self.layer_scores[key] = score
        return score

    def unit_at(self, kind, group, setting: Setting, chunks: int) -> Candidate:
        """The combination at unit granularity with every unit of chunks < ``chunks`` a
        candidate (no memory target): the unit-granularity numbers next to a layer score."""
        base = self.base(kind, group, setting)
        if chunks == 0:
            return base
        return self._pass(kind, group, setting, base, chunks, None)

    def choose_granularity(self, best: Candidate | None, shapes, settings: list[Setting], refine: bool = True
                           ) -> tuple[Candidate | None, str, str]:
        """(plan, granularity, reason); see :func:`plan_job`."""
        tol = self.layer_tolerance
        reason = ""
        granularity = "unit"
        if best is not None and best.offload_chunks > 0 and refine:
            score = self.layer_score(best.kind, best.group_size, best.setting, best.offload_chunks)
            if score is None:
                reason = ("unit: layers under full recomputation keep only their checkpoint inputs, nothing to stream"
                          if not _streams_layers(self.job, best.setting) else "unit: layer streaming not scored")
            else:
                best.layer = score
                worst_unit, worst_layer = max(best.memory_bytes), max(score.memory_bytes)
                if not score.gpu_fits:
                    reason = f"unit: layer streaming does not fit ({worst_layer / GiB:.2f} GiB on the worst rank)"
                elif not score.host_fits:
                    reason = (f"unit: layer streaming needs {score.host_bytes_per_node / GiB:.1f} GiB of pinned host memory per "
                              f"node, over the host budget")
                elif score.slowdown > tol or score.makespan > best.makespan * (1 + tol):
                    reason = (f"unit: layer streaming would slow the iteration by {score.slowdown:+.2%} (the host link cannot "
                              f"hide the per-layer copies; tolerance {tol:.1%})")
                elif worst_layer >= worst_unit - 2**20:
                    reason = (f"unit: layer streaming does not lower the worst rank's memory ({worst_layer / GiB:.2f} GiB vs "
                              f"{worst_unit / GiB:.2f} GiB)")
                else:
                    granularity = "layer"
                    reason = (f"layer: lowers the worst rank's memory from {worst_unit / GiB:.2f} to {worst_layer / GiB:.2f} GiB "
                              f"at {score.slowdown:+.2%}, with the same offload chunks (K = {best.offload_chunks})")
        # Faster combinations (or any, when nothing fits) that fit only with layer streaming.
        limit = math.inf if best is None else best.layer.makespan if granularity == "layer" else best.makespan
        pairs = []
        floor: dict[tuple, float] = {}  # a shape's makespan only grows up the recompute ladder
        for setting in settings:
            for kind, group in shapes:
                if floor.get((kind, group), 0.0) >= limit * (1 - _TOLERANCE):
                    continue
                base = self.base(kind, group, setting)
                floor[(kind, group)] = base.makespan
                if best is not None and (kind, group, setting.recompute) == (best.kind, best.group_size, best.setting.recompute):
                    continue
                if base.makespan < limit * (1 - _TOLERANCE) and _streams_layers(self.job, setting):
                    pairs.append((base.makespan, base.sort_key(), kind, group, setting))
        pairs.sort(key=lambda item: item[:2])
        tried = []
        for makespan, _, kind, group, setting in pairs:
            if self.layer_runs >= self.layer_budget:
                break
            score = self.layer_score(kind, group, setting, self.job.vpp)
            if score is None:
                continue
            if not score.fits or score.slowdown > tol or score.makespan >= limit * (1 - _TOLERANCE):
                tried.append(f"{kind}{'' if group is None else f' g={group}'} recompute {setting.recompute.label}: "
                             + (f"{max(score.memory_bytes) / GiB:.2f} GiB on the worst rank" if not score.gpu_fits
                                else "host memory over budget" if not score.host_fits else f"{score.slowdown:+.2%} slower"))
                continue
            candidate = self.unit_at(kind, group, setting, self.job.vpp)
            candidate.layer = score
            why = ("nothing fits at unit granularity" if best is None
                   else f"faster than the {granularity} plan ({best.label()}, {limit:.3f} s)")
            return candidate, "layer", (f"layer: {candidate.kind}{'' if candidate.group_size is None else f' g={candidate.group_size}'}"
                                        f", recompute {setting.recompute.label} fits only with layer streaming "
                                        f"({max(score.memory_bytes) / GiB:.2f} GiB on the worst rank, "
                                        f"{score.slowdown:+.2%}): {why}")
        what = "a faster combination" if best is not None else "the job"
        if granularity == "layer":
            # Fewer streamed chunks (less host memory and link traffic) if they meet the same rule.
            worst_unit = max(best.memory_bytes)
            while best.layer.chunks > 1 and self.layer_runs < self.layer_budget:
                fewer = self.layer_score(best.kind, best.group_size, best.setting, best.layer.chunks - 1)
                if (fewer is None or not fewer.fits or fewer.slowdown > tol or fewer.makespan > best.makespan * (1 + tol)
                        or max(fewer.memory_bytes) >= worst_unit - 2**20):
                    break
                best.layer = fewer
                reason = (f"layer: lowers the worst rank's memory from {worst_unit / GiB:.2f} to "
                          f"{max(fewer.memory_bytes) / GiB:.2f} GiB at {fewer.slowdown:+.2%}, streaming fewer chunks "
                          f"(K = {fewer.chunks}) than the unit plan offloads (K = {best.offload_chunks})")
            return best, "layer", reason
        if tried:
            reason = (reason + "; " if reason else "unit: ") + (
                f"layer streaming of every chunk does not make {what} fit ({'; '.join(tried)})")
        elif not reason:
            reason = ("unit: no offload needed" if best is not None and best.offload_chunks == 0 and not pairs
                      else "unit: the plan offloads nothing" if best is not None and best.offload_chunks == 0
                      else "unit: layer streaming does not make the job fit either")
        return best, "unit", reason

    def _offload_search(self, kind, group, setting: Setting, baseline: Candidate) -> Candidate | None:
        """The fitting candidate with the fewest offload chunks K for one combination, or None.

        First the most this combination can shed (every chunk a candidate, no memory target):
        if that does not fit, no K does. Then the smallest K whose pass, aiming at the budget
        in units, fits (binary search: a larger K only adds candidates)."""
        v = self.job.vpp
        target = self.target_units(setting, baseline)
        most = self._pass(kind, group, setting, baseline, v, None)
        if not most.gpu_fits:
            return None
        fitting = most if most.fits else None
        low, high = 1, v  # invariant: K = high fits (with or without target), every K < low does not
        aimed: dict[int, Candidate] = {}
        while low <= high:
            chunks = (low + high) // 2
            candidate = aimed[chunks] = self._aimed(kind, group, setting, baseline, chunks, target)
            if candidate is not None and candidate.fits:
                fitting, high = candidate, chunks - 1
            else:
                low = chunks + 1
        return fitting

    def _aimed(self, kind, group, setting: Setting, baseline: Candidate, chunks: int, target: list[int]) -> Candidate | None:
        """Offload candidates of chunks < K only until each rank is down to ``target`` units; if
        the pass meets its target but the bytes (first / last stage extras) still exceed the
        budget, aim once more, lower by the excess."""
        candidate = self._pass(kind, group, setting, baseline, chunks, target)
        if candidate.fits or any(p > t for p, t in zip(candidate.simulation.peak_units, target)) or not candidate.host_fits:
            return candidate
        excess_units = math.ceil(candidate.excess(self.budget) / max(setting.typical.offloadable, 1))
        lower = self._pass(kind, group, setting, baseline, chunks, [max(0, t - max(1, excess_units)) for t in target])
        if lower.fits or not lower.host_fits:
            return lower
        return self._pass(kind, group, setting, baseline, chunks, None)  # every candidate of chunks < K

    def _pass(self, kind, group, setting: Setting, baseline: Candidate, chunks: int, target: list[int] | None) -> Candidate:
        base = baseline.simulation
        plan = plan_offload(base.schedule, setting.costs, chunks=chunks, memory_target=target, baseline=base)
        sim = simulate(plan.schedule, setting.costs, no_offload_makespan=base.makespan)
        return self.score(kind, group, setting, sim, chunks, plan.offloaded)


def plan_job(
    job: JobSpec,
    hardware: Hardware,
    *,
    memory_budget_gib: float | None = None,
    reserve_gib: float | None = None,
    host_memory_gib: float | None = None,
    host_memory_fraction: float = 0.5,
    families: Sequence[str] = FAMILIES,
    allow_recompute: bool = True,
    measured_unit_bytes: Sequence[Sequence[float]] | None = None,
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
    remedies: bool = True,
    granularities: Sequence[str] = GRANULARITIES,
    layer_slowdown_tolerance: float = DEFAULT_LAYER_SLOWDOWN_TOLERANCE,
    layer_refine: bool = True,
) -> Plan:
    """Plan ``job`` on ``hardware``.

    - ``memory_budget_gib``: the GPU budget for everything the job holds (static state, working
      memory, activations); default GPU memory minus ``reserve_gib`` (default
      :func:`default_reserve_gib`).
    - ``host_memory_gib``: host RAM per node; default the hardware's, else this machine's
      /proc/meminfo. Offload may pin ``host_memory_fraction`` of it (the runtime's default host
      budget is half the node's RAM).
    - ``families``: schedules allowed (``megatron``: Megatron's own orders, which the runtime
      follows today; ``gis``: generalized interleaving).
    - ``allow_recompute``: search the recompute ladder (else only the job's own setting).
    - ``measured_unit_bytes[r][c]``: bytes of one unit of chunk c on pipeline rank r as the
      runtime measured them for the job's own recomputation; each (rank, chunk) cost-model value
      is scaled by measured / predicted, for every recompute level.
    - ``min_offload_bytes``: the runtime's threshold; smaller saved tensors stay on the device.
    - ``remedies``: when nothing fits, re-plan with changes to find the cheapest that fits.
    - ``granularities``: ``("unit", "layer")`` (default) also scores layer streaming;
      ``("unit",)`` plans whole units only.
    - ``layer_slowdown_tolerance``: the most a layer-granularity plan may add to the iteration
      time (default 1%): over the same schedule without copies, and over the unit plan it
      replaces.
    - ``layer_refine``: score the fitting unit plan at layer granularity too (else only look
      for faster combinations that fit only with layer streaming).

    **Granularity** (``--offload-granularity``). The search above runs at unit granularity.
    Then, with ``layer`` allowed (at most :data:`LAYER_SCORES_PER_PLAN` layer simulations,
    each :meth:`_Search.layer_score`: the cost model's bytes per layer, per-layer times from
    the FLOPs, the host link's GB/s, reloads as late as the link allows and copies it cannot
    hide dropped):

    1. a fitting plan that offloads (K chunks) is scored at layer granularity with the same K;
       it becomes a ``layer`` plan when that fits, lowers the worst rank's predicted memory
       and keeps the iteration time within the tolerance (of the same schedule without
       copies and of the unit plan); otherwise it stays ``unit`` (the reason says which
       condition failed: a link too slow to hide per-layer copies, no lower peak, ...). With
       simulations left after step 2, a layer plan then streams fewer chunks (K - 1, ...)
       while that still meets the same rule (less host memory and link traffic);
    2. combinations faster than the plan (or all, when nothing fits at unit granularity;
       recompute levels whose floor with one layer resident fits), fastest first, are scored
       with every chunk streaming; the first that fits within the tolerance and is faster
       becomes the plan, at ``layer`` granularity. So a job that fits only with layer
       streaming is reported as fitting, with ``granularity == "layer"``.

    Remedies (when nothing fits at either granularity) are planned at unit granularity only,
    to keep the search fast: the change they name is enough, perhaps more than needed.

    The plan's headline predictions (:attr:`Plan.activation_bytes`, memory, host, slowdown)
    are those of its granularity; both granularities' peaks are in
    :meth:`Plan.granularity_peaks`.
    """
    started = time.perf_counter()
    if not 0 < host_memory_fraction <= 1:
        raise ValueError(f"--host-memory-fraction {host_memory_fraction} must lie in (0, 1]")
    families = tuple(families)
    unknown = set(families) - set(FAMILIES)
    if unknown or not families:
        raise ValueError(f"--offload-schedule {','.join(sorted(unknown)) or '(none)'}: choose from {', '.join(FAMILIES)}")
    reserve = default_reserve_gib(hardware.gpu_memory_gib) if reserve_gib is None else reserve_gib
    if memory_budget_gib is not None:
        if not memory_budget_gib > 0:
            raise ValueError(f"--memory-budget-gib {memory_budget_gib} must be > 0")
        budget = memory_budget_gib * GiB
        reserve_bytes = max(0.0, hardware.gpu_memory_gib * GiB - budget)
    else:
        if not 0 <= reserve < hardware.gpu_memory_gib:
            raise ValueError(f"--memory-reserve-gib {reserve} must lie in [0, GPU memory {hardware.gpu_memory_gib:g} GiB)")
        budget = (hardware.gpu_memory_gib - reserve) * GiB
        reserve_bytes = reserve * GiB
    if host_memory_gib is not None:
        host_gib, host_source = host_memory_gib, "--host-memory-gib"
    elif hardware.host_memory_gib is not None:
        host_gib, host_source = hardware.host_memory_gib, f"hardware {hardware.name}"
    else:
        host_gib, host_source = host_memory_from_proc(), "/proc/meminfo of this machine"
        if host_gib is None:
            raise ValueError("host RAM unknown: give --host-memory-gib (RAM per node)")
    host_budget = host_gib * GiB * host_memory_fraction
    calibration = None
    if measured_unit_bytes is not None:
        calibration = []
        for rank in range(job.pp):
            row = []
            for chunk in range(job.vpp):
                predicted = unit_bytes(job, rank, chunk, job.recompute, min_offload_bytes).total
                row.append(float(measured_unit_bytes[rank][chunk]) / predicted if predicted else 1.0)
            calibration.append(row)

    granularities = tuple(granularities)
    if "unit" not in granularities or set(granularities) - set(GRANULARITIES):
        raise ValueError(f"--offload-granularity {','.join(granularities)}: plan with unit, or unit and layer")
    search = _Search(job, hardware, budget, host_budget, min_offload_bytes, calibration, layer_tolerance=layer_slowdown_tolerance)
    shapes, notes = schedule_shapes(job, families)
    if not shapes:
        raise ValueError("no schedule can run this job: " + "; ".join(notes) + " (allow --offload-schedule gis, or change "
                         "--global-batch-size / --micro-batch-size)")
    ladder = recompute_ladder(job) if allow_recompute else [job.recompute]
    # The job as given, for "without the plan" and the slowdown.
    own_shapes, own_notes = schedule_shapes(job, ("megatron",))
    own_kind, own_group = own_shapes[0] if own_shapes else shapes[0]
    own_setting = search.setting(job.recompute, 0)
    own_sim = simulate(search.schedule(own_kind, own_group), own_setting.costs)
    baseline = search.score(own_kind, own_group, own_setting, own_sim, 0, [[] for _ in range(job.pp)])
    search.scored.clear()

    # Recompute levels whose floor (static + working + one unit) is over budget on some rank
    # cannot fit whatever the schedule and offload: not simulated.
    settings = [search.setting(recompute, level) for level, recompute in enumerate(ladder)]
    viable = [setting for setting in settings if max(setting.floor) <= budget]
    best, combos = search.run(shapes, viable)
    granularity, granularity_reason = "unit", "unit: --offload-granularity unit"
    if "layer" in granularities:
        # With layer streaming a rank can hold less than a whole unit: static + working + one layer.
        layer_viable = [setting for setting in settings if max(_layer_floor(job, setting, min_offload_bytes)) <= budget]
        best, granularity, granularity_reason = search.choose_granularity(best, shapes, layer_viable, refine=layer_refine)
    scored = sorted(search.scored, key=lambda c: (not c.fits, c.makespan, c.sort_key()))
    plan = Plan(job=job, hardware=hardware, fits=best is not None, chosen=best, baseline=baseline, budget_bytes=budget,
                reserve_bytes=reserve_bytes, host_budget_bytes_per_node=host_budget, host_memory_source=host_source,
                missing_bytes=0.0, missing_host_bytes_per_node=0.0, remedy=None, remedies_tried=[], reasons=[],
                alternatives=[c for c in scored if c is not best][:8], notes=notes + [n for n in own_notes if n not in notes],
                granularity=granularity, granularity_reason=granularity_reason)
    lowest = min(settings, key=lambda setting: max(setting.floor))
    plan.floor_bytes = lowest.floor
    if best is None:
        if search.scored:
            closest = min(search.scored, key=lambda c: (max(0.0, c.excess(budget)), max(0.0, c.host_bytes_per_node - host_budget), c.makespan))
            plan.chosen = closest
            if closest.layer is None:  # scored at layer granularity too (no new simulation)
                closest.layer = search.layer_scores.get((closest.kind, closest.group_size, closest.setting.recompute,
                                                         closest.offload_chunks))
            plan.missing_bytes = max(0.0, closest.excess(budget))
            plan.missing_host_bytes_per_node = max(0.0, closest.host_bytes_per_node - host_budget)
        else:  # even the floor is over budget: what is missing is at least this
            plan.chosen = None
            plan.missing_bytes = max(lowest.floor) - budget
            plan.missing_is_lower_bound = True
        if remedies:
            plan.remedy, plan.remedies_tried = _find_remedy(job, hardware, memory_budget_gib=memory_budget_gib, reserve_gib=reserve_gib,
                                                             host_memory_gib=host_gib, host_memory_fraction=host_memory_fraction,
                                                             families=families, allow_recompute=allow_recompute,
                                                             min_offload_bytes=min_offload_bytes, granularities=("unit",))
    plan.evaluated = len(search.scored)
    plan.layer_scores = search.layer_runs
    plan.reasons = _reasons(plan, combos)
    plan.planning_s = time.perf_counter() - started
    return plan


def score_layer_granularity(plan: Plan, chunks: int | None = None, *, candidate: Candidate | None = None,
                            shape: tuple[str, int | None] | None = None, min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES,
                            full_schedule: bool = False) -> LayerScore | None:
    """``candidate``'s combination (default the plan's; ``shape`` = (kind, group size)
    replaces its schedule) scored at layer granularity with the units of chunks < ``chunks``
    streaming (default its offload chunks; 0 = nothing streams, which must reproduce the unit
    peaks without offload), against ``plan``'s budgets, from cost-model bytes (no
    calibration). ``full_schedule``: simulate the job's own microbatches instead of the short
    schedule. None under full recomputation."""
    candidate = candidate or plan.chosen or plan.baseline
    search = _Search(plan.job, plan.hardware, plan.budget_bytes, plan.host_budget_bytes_per_node, min_offload_bytes, None,
                     layer_scores=1)
    setting = search.setting(candidate.setting.recompute, candidate.setting.level)
    kind, group = shape or (candidate.kind, candidate.group_size)
    chunks = candidate.offload_chunks if chunks is None else chunks
    if full_schedule:
        search._proxies[(kind, group, setting.recompute, chunks)] = (plan.job.microbatches, search.schedule(kind, group))
    return search.layer_score(kind, group, setting, chunks)


def _layer_floor(job: JobSpec, setting: Setting, min_offload_bytes: int) -> list[float]:
    """Per rank, a lower bound on what a layer-streaming plan holds: static state, working
    memory and one layer's saved activations (or the rank's smallest unit, if smaller)."""
    if not _streams_layers(job, setting):
        return setting.floor
    layer = split_bytes(layer_terms(job, setting.recompute), min_offload_bytes).total
    return [s.total + w + min(layer, min(u.total for u in row)) for s, w, row in zip(setting.static, setting.working, setting.units)]


# ---- remedies ------------------------------------------------------------------------------------------

def _remedy_jobs(job: JobSpec, allow_recompute: bool) -> list[tuple[str, dict, int, JobSpec]]:
    """Changed jobs to try: (description, flags, extra GPUs, job)."""
    out = []
    if not allow_recompute and job.recompute.granularity != "full":
        full = Recompute(granularity="full", method="uniform", num_layers=1)
        out.append(("full recompute: " + " ".join(full.megatron_flags()), {"--recompute-granularity": "full"}, 0,
                    job.with_changes(recompute=full)))
    gbs = job.global_batch_size or job.micro_batch_size * job.data_parallel_size
    mbs = job.micro_batch_size // 2
    while mbs >= 1:
        if gbs % (mbs * job.data_parallel_size) == 0:
            out.append((f"--micro-batch-size {mbs}", {"--micro-batch-size": mbs}, 0,
                        job.with_changes(micro_batch_size=mbs, global_batch_size=gbs)))
            break
        mbs //= 2
    for factor in (2, 4):
        p = job.pp * factor
        if p > job.num_layers:
            break
        v = next((v for v in range(job.vpp, 0, -1) if job.num_layers % (p * v) == 0), None)
        if v is None:
            continue
        dp, extra = job.data_parallel_size, 0
        if dp % factor == 0 and gbs % (job.micro_batch_size * dp // factor) == 0:
            dp //= factor
        else:
            extra = job.world_size * (factor - 1)
        flags = {"--pipeline-model-parallel-size": p}
        if v != job.vpp:
            flags["--num-virtual-stages-per-pipeline-rank"] = v
        where = "same GPUs, data-parallel size " + str(dp) if extra == 0 else f"{extra} more GPUs"
        change = f"--pipeline-model-parallel-size {p}" + (f" with {v} virtual stages per rank" if v != job.vpp else "") + f" ({where})"
        try:
            changed = job.with_changes(pipeline_model_parallel_size=p, virtual_stages=v, data_parallel_size=dp, global_batch_size=gbs,
                                       microbatch_group_size_per_vp_stage=None)
        except ValueError:
            continue
        out.append((change, flags, extra, changed))
    return out


def _find_remedy(job: JobSpec, hardware: Hardware, **kwargs) -> tuple[Remedy | None, list[str]]:
    best: Remedy | None = None
    tried = []
    for change, flags, extra, changed in sorted(_remedy_jobs(job, kwargs["allow_recompute"]), key=lambda item: item[2]):
        if best is not None and extra > best.extra_gpus:
            tried.append(f"{change}: not tried (needs more GPUs than a change that fits)")
            continue
        try:
            plan = plan_job(changed, hardware, remedies=False, **kwargs)
        except ValueError as error:
            tried.append(f"{change}: cannot plan ({error})")
            continue
        if not plan.fits:
            tried.append(f"{change}: still {plan.missing_bytes / GiB:.2f} GiB short on the worst rank")
            continue
        # Cost: GPUs first, then time for the same global batch.
        tried.append(f"{change}: fits, {plan.iteration_time_s:.3f} s per iteration ({plan.schedule_kind}, "
                     f"recompute {plan.recompute.label}, offload K={plan.offload_chunks})")
        remedy = Remedy(change=change, flags=flags, extra_gpus=extra, plan=plan)
        if best is None or (extra, plan.iteration_time_s) < (best.extra_gpus, best.plan.iteration_time_s):
            best = remedy
    return best, tried


# ---- explanation -------------------------------------------------------------------------------------

def _reasons(plan: Plan, combos) -> list[str]:
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    budget = plan.budget_bytes
    base = plan.baseline
    worst = max(range(len(base.memory_bytes)), key=base.memory_bytes.__getitem__)
    reasons = [f"budget {gib(budget)} per GPU ({plan.hardware.gpu_memory_gib:g} GiB - {gib(plan.reserve_bytes)} reserve); "
               f"host budget {gib(plan.host_budget_bytes_per_node)} per node ({plan.host_memory_source})"]
    setting = base.setting
    reasons.append(f"k = {setting.k:.3f}: a unit ({plan.job.layers_per_chunk} layers, {gib(setting.typical.offloadable)} "
                   f"offloadable) takes {setting.typical.offloadable / plan.hardware.link_bytes_per_s * 2 * 1e3:.1f} ms to copy "
                   f"out and back, {(setting.forward_s + setting.backward_s) * 1e3:.1f} ms to compute"
                   + (" (k <= 1: the link keeps up with compute)" if setting.k <= 1 else " (k > 1: only long-lived units can be hidden)"))
    verdict = "fits" if base.fits else f"needs {gib(base.memory_bytes[worst])} on rank {worst}"
    reasons.append(f"as given ({base.label()}): {verdict}")
    chosen = plan.chosen
    if chosen is None:
        rank = max(range(len(plan.floor_bytes)), key=plan.floor_bytes.__getitem__)
        reasons.append(f"does not fit: at least {gib(plan.missing_bytes)} missing on rank {rank}: its parameters, gradients and optimizer "
                       f"state, working memory and a single unit already need {gib(plan.floor_bytes[rank])}, whatever is "
                       "offloaded or recomputed")
        reasons += _remedy_reasons(plan)
        return reasons
    if plan.fits:
        if chosen is base or (chosen.kind, chosen.group_size, chosen.setting.level, chosen.offload_chunks) == (base.kind, base.group_size, 0, 0):
            reasons.append("chosen: the job as given, no offload needed")
        else:
            reasons.append(f"chosen: {plan.label()}: worst rank {gib(max(plan.memory_bytes))}, slowdown {plan.slowdown:+.2%}")
            if plan.granularity == "layer":
                layer = chosen.layer
                reasons.append(f"streamed units per rank: {', '.join(map(str, layer.streamed_units))}; leaving the device entirely "
                               f"(those with a lifespan): {', '.join(map(str, layer.offloaded_units))}; host "
                               f"{gib(layer.host_bytes_per_node)} per node")
            elif chosen.offload_chunks:
                per_rank = ", ".join(str(len(u)) for u in chosen.offloaded)
                reasons.append(f"offloaded units per rank: {per_rank} (longest-lived first, chunks < {chosen.offload_chunks}); "
                               f"host {gib(chosen.host_bytes_per_node)} per node")
            if chosen.setting.level:
                reasons.append(f"recompute {chosen.setting.recompute.label}: offload alone cannot reach the budget at this speed")
        shape = lambda c: (c.kind, c.group_size, c.setting.level)  # noqa: E731
        same = [c for c in plan.alternatives if c.fits and math.isclose(c.makespan, chosen.makespan, rel_tol=_TOLERANCE)
                and shape(c) != shape(chosen)]
        as_given = shape(chosen) == shape(base) and chosen.offload_chunks == 0
        if same and not as_given:
            reasons.append(f"also fits at the same predicted time: {same[0].label()} (worst rank {gib(max(same[0].memory_bytes))}); "
                           "the plan prefers less recomputation, fewer offloaded units, then Megatron's own schedule")
        reasons.append(f"granularity {plan.granularity_reason}")
        faster = [c for c in plan.alternatives if c.makespan < plan.iteration_time_s * (1 - _TOLERANCE)]
        if faster:
            f = min(faster, key=lambda c: c.makespan)
            reasons.append(f"faster but over budget: {f.label()} ({gib(max(f.memory_bytes))} on the worst rank)")
    else:
        reasons.append(f"does not fit: {gib(plan.missing_bytes)} missing on the worst rank even with {chosen.label()}"
                       + (f"; host memory {gib(plan.missing_host_bytes_per_node)} short per node" if plan.missing_host_bytes_per_node else ""))
        reasons += _remedy_reasons(plan)
    return reasons


def _remedy_reasons(plan: Plan) -> list[str]:
    if plan.remedy is not None:
        return [f"cheapest change that fits: {plan.remedy.change} -> {plan.remedy.plan.chosen.label()}, "
                f"{plan.remedy.plan.iteration_time_s:.3f} s per iteration"]
    if plan.remedies_tried:
        return ["no tried change fits: " + "; ".join(plan.remedies_tried)]
    return []


# ---- policy auto: the fewest units that keep a rank within an activation budget ----------------------
#
# One selection, used by the runtime (``--offload-policy auto``, at the first training call) and by
# ``megatron-offload plan`` (its "policy auto" line): :func:`choose_offload_units` for one rank's
# fixed order, :func:`plan_auto_offload` for every pipeline rank of a job.


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
        return {"rank": self.rank, "offload": sorted(self.offload), "units": self.units, "candidates": self.candidates,
                "budget_bytes": self.budget_bytes, "peak_bytes": self.peak_bytes, "peak_without_bytes": self.peak_without_bytes,
                "floor_bytes": self.floor_bytes, "overhead_bytes": self.overhead_bytes, "fits": self.fits,
                "per_chunk": self.per_chunk()}


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < GiB else f"{nbytes / GiB:.2f} GiB"


def _compute_positions(order) -> tuple[list, dict, dict]:
    from megatron_offload.schedule.ir import OpKind

    compute = [op for op in order if op.kind in (OpKind.FORWARD, OpKind.BACKWARD)]
    forward_at, backward_at = {}, {}
    for position, op in enumerate(compute):
        (forward_at if op.kind is OpKind.FORWARD else backward_at)[op.unit] = position
    return compute, forward_at, backward_at


def resident_peak(ops, units: Sequence[UnitBytes], overhead_bytes: float = 0.0) -> float:
    """Peak resident activation bytes of one rank's runtime op list (F, B, O, R: what
    :func:`schedule.layers.runtime_rank_ops` returns), sampled where the runtime measures: after each
    forward (before its offload) and before each backward (after the reloads before it). A
    forward adds its unit's ``total`` bytes, an offload removes the ``offloadable`` part, a
    reload brings it back, a backward frees the unit after its sample. ``units[c]``: bytes of
    one unit of model chunk c on this rank."""
    from megatron_offload.schedule.ir import OpKind

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


def choose_offload_units(order, units: Sequence[UnitBytes], budget_bytes: float, *, prefetch_distance: int = 1,
                         overhead_bytes: float = 0.0, rank: int = 0) -> RankOffloadChoice:
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
    import heapq

    from megatron_offload.schedule.layers import runtime_rank_ops

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
        first, last = start + 1, backward_at[unit] - prefetch_distance - 1  # away at samples first..last
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
        rank=rank, offload=offload, units=len(forward_at), candidates=len(candidates), budget_bytes=budget_bytes,
        peak_bytes=resident_peak(runtime_rank_ops(order, set(offload), prefetch_distance), units, overhead_bytes),
        peak_without_bytes=without + overhead_bytes, floor_bytes=floor + overhead_bytes, overhead_bytes=overhead_bytes,
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
                f"{f' ({chunks})' if chunks else ''}; predicted peak {_mib(choice.peak_bytes)} {relation} budget "
                f"{_mib(choice.budget_bytes)} (without offload {_mib(choice.peak_without_bytes)})")

    def log_lines(self) -> list[str]:
        """Megatron-style log lines: one per pipeline rank."""
        return [f"> megatron-offload auto plan: {self.rank_line(choice)}" for choice in self.ranks]

    def does_not_fit_message(self) -> str:
        worst = max(self.ranks, key=lambda c: c.floor_bytes - c.budget_bytes)
        missing = worst.floor_bytes - worst.budget_bytes
        least = max(self.budget_bytes + c.floor_bytes - c.budget_bytes for c in self.ranks)
        text = (f"--offload-memory-budget-gib too small: even with every unit offloaded, pipeline rank {worst.rank} keeps "
                f"{_mib(worst.floor_bytes)} of activations resident (the unit in its forward or backward, the one "
                f"reloaded ahead, small tensors that stay, p2p buffers) against an activation budget of "
                f"{_mib(worst.budget_bytes)}: {_mib(missing)} missing. Remedy: raise --offload-memory-budget-gib by at "
                f"least {_mib(least - self.budget_bytes)} (to {least / GiB:.4g} GiB"
                f"{'' if all(c.budget_bytes == self.budget_bytes for c in self.ranks) else ' of activation budget'})")
        if self.job is not None:
            text += "; or make each unit smaller: " + "; ".join(_smaller_units(self.job, worst.rank))
        return text


def _smaller_units(job: JobSpec, rank: int) -> list[str]:
    """Concrete changes that shrink the largest unit of ``rank``, with the bytes they give."""
    now = max(unit_bytes(job, rank, chunk).total for chunk in range(job.vpp))
    out = []
    if job.micro_batch_size > 1:
        half = job.micro_batch_size // 2
        smaller = job.with_changes(micro_batch_size=half, global_batch_size=None)
        out.append(f"--micro-batch-size {half} ({_mib(max(unit_bytes(smaller, rank, c).total for c in range(job.vpp)))} per unit "
                   f"instead of {_mib(now)})")
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


def plan_auto_offload(job: JobSpec, orders, budget_bytes: float | Sequence[float], *, prefetch_distance: int = 1,
                      min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES, overhead_bytes: float | Sequence[float] = 0.0,
                      units: Sequence[Sequence[UnitBytes]] | None = None, ranks: Sequence[int] | None = None) -> AutoOffloadPlan:
    """Policy ``auto`` for the pipeline ranks of ``job``: ``orders[r]`` is rank r's fixed op
    order (Megatron's), the bytes of a unit come from the cost model (``units[r][c]`` overrides
    them), ``overhead_bytes`` (one number, or one per rank) is added to every predicted peak;
    ``budget_bytes``: one activation budget, or one per rank. ``ranks`` restricts the plan to
    some ranks (default all)."""
    if units is None:
        units = [[unit_bytes(job, rank, chunk, job.recompute, min_offload_bytes) for chunk in range(job.vpp)]
                 for rank in range(job.pp)]
    if isinstance(overhead_bytes, (int, float)):
        overhead_bytes = [float(overhead_bytes)] * job.pp
    budgets = [float(budget_bytes)] * job.pp if isinstance(budget_bytes, (int, float)) else list(budget_bytes)
    ranks = range(job.pp) if ranks is None else ranks
    choices = [choose_offload_units(orders[rank], units[rank], budgets[rank], prefetch_distance=prefetch_distance,
                                    overhead_bytes=overhead_bytes[rank], rank=rank) for rank in ranks]
    return AutoOffloadPlan(budget_bytes=min(budgets[rank] for rank in ranks), ranks=choices, unit_bytes=[list(row) for row in units], job=job,
                           prefetch_distance=prefetch_distance)


def auto_for_plan(plan: Plan, *, memory_budget_gib: float | None = None, scope: str = "activations",
                  reserve_gib: float = 2.0, prefetch_distance: int = 1,
                  min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES) -> AutoOffloadPlan | None:
    """What ``--offload-policy auto`` will choose at run time for ``plan``'s job as given
    (Megatron's own schedule and the job's recomputation): the same selection as the runtime
    (:func:`plan_auto_offload`) on the same orders and the same cost-model bytes.

    ``memory_budget_gib`` is the runtime's ``--offload-memory-budget-gib``: with ``scope``
    ``activations`` one activation budget for every rank; with ``device`` the device memory,
    from which each rank's static state (parameters, gradients, optimizer), working memory and
    ``reserve_gib`` are subtracted, as the runtime does. None: the largest activation budget
    one ``--offload-memory-budget-gib`` (scope activations) can give without exceeding the
    plan's GPU budget on any rank: min over ranks of (budget - static - working); it is kept
    in :attr:`AutoOffloadPlan.notes` and as ``recommended_gib`` in the report. None is
    returned when Megatron's schedule cannot run the job."""
    base = plan.baseline
    if base.kind not in ("1f1b", "interleaved"):
        return None
    job = plan.job
    setting = base.setting
    static = [s.total for s in setting.static]
    if memory_budget_gib is None:
        budget: float | list[float] = min(plan.budget_bytes - s - w for s, w in zip(static, setting.working))
        note = (f"--offload-memory-budget-gib {max(budget, 0) / GiB:.2f}: the GPU budget {plan.budget_bytes / GiB:.2f} GiB "
                "minus static and working memory on the tightest rank")
    elif scope == "device":
        budget = [memory_budget_gib * GiB - s - w - reserve_gib * GiB for s, w in zip(static, setting.working)]
        note = (f"--offload-memory-budget-scope device --offload-memory-budget-gib {memory_budget_gib:g}: per rank minus "
                f"static and working memory and a {reserve_gib:g} GiB reserve")
    elif scope == "activations":
        budget = memory_budget_gib * GiB
        note = f"--offload-memory-budget-gib {memory_budget_gib:g} (resident activations per rank)"
    else:
        raise ValueError(f"--offload-memory-budget-scope {scope!r}: choose activations or device")
    if isinstance(budget, float) and budget <= 0:
        budget = 0.0
    auto = plan_auto_offload(job, base.schedule.ranks, budget, prefetch_distance=prefetch_distance,
                             min_offload_bytes=min_offload_bytes, overhead_bytes=[overhead_bytes(job, r) for r in range(job.pp)],
                             units=setting.units)
    auto.notes.append(note)
    return auto
