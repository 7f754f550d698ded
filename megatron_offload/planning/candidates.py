"""What the planner scores: one recompute level's inputs (:class:`Setting`) and one
(schedule, group size, recomputation, offload) combination (:class:`Candidate`, with its
layer-streaming score :class:`LayerScore`), the recompute ladder and the schedule shapes tried.

A :class:`Setting` holds everything that depends on the recomputation: the cost model's bytes
per unit (optionally calibrated by measured ones), static and working memory per rank, forward
and backward times from the FLOPs and the achieved rate, and the offload ratio k.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from megatron_offload.planning.costmodel import (
    StaticBytes,
    UnitBytes,
    layer_flops,
    offload_ratio,
    static_bytes,
    unit_bytes,
    working_bytes,
)
from megatron_offload.planning.hardware import Hardware
from megatron_offload.planning.job import RECOMPUTE_MODULES, JobSpec, Recompute
from megatron_offload.schedule.catalog import check_schedule_args
from megatron_offload.schedule.costs import CostModel
from megatron_offload.schedule.ir import Schedule
from megatron_offload.schedule.simulate import Simulation

Family = Literal["megatron", "gis"]
FAMILIES: tuple[str, ...] = ("megatron", "gis")

NORM_RECOMPUTE_FLOP_EQUIVALENT = 600
"""Recomputing a norm is memory-bound: it reads and writes ~2 T h d bytes. At the ~150 FLOP per
byte of an H100 (989 TFLOP/s over 6.7 TB/s) that costs about 600 FLOP-equivalents per element of
width h per token (bf16). Used so that ``--recompute-modules layernorm`` is not free."""

TOLERANCE = 1e-6
"""Relative tolerance under which two makespans count as equal."""

Granularity = Literal["unit", "layer"]
GRANULARITIES: tuple[str, ...] = ("unit", "layer")


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
        return [s.total + w + min(u.total for u in row)
                for s, w, row in zip(self.static, self.working, self.units)]


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
    steps = (([] if job.uses_flash else ["core_attn"]) + ["layernorm"]
             + ([] if job.add_bias_linear else ["mlp"]))
    for step in steps:
        if step not in modules:
            modules.append(step)
        ordered = (tuple(m for m in RECOMPUTE_MODULES if m in modules)
                   + tuple(m for m in modules if m not in RECOMPUTE_MODULES))
        candidate = Recompute(granularity="selective", modules=ordered)
        if candidate not in ladder:
            ladder.append(candidate)
    ladder.append(Recompute(granularity="full", method="uniform", num_layers=1))
    return ladder


def build_setting(job: JobSpec, hardware: Hardware, recompute: Recompute, level: int,
                  min_offload_bytes: int, calibration: list[list[float]] | None) -> Setting:
    """The :class:`Setting` of ``recompute`` (position ``level`` in the ladder) for ``job`` on
    ``hardware``; ``calibration[r][c]`` scales the cost model's bytes of a unit (measured /
    predicted)."""
    p, v = job.pp, job.vpp
    units = []
    for rank in range(p):
        row = []
        for chunk in range(v):
            unit = unit_bytes(job, rank, chunk, recompute, min_offload_bytes)
            if calibration is not None:
                factor = calibration[rank][chunk]
                unit = UnitBytes(total=int(unit.total * factor),
                                 offloadable=int(unit.offloadable * factor))
            row.append(unit)
        units.append(row)
    typical = unit_bytes(job, -1, -1, recompute, min_offload_bytes)
    if calibration is not None:
        middle = calibration[min(1, p - 1)][0]
        typical = UnitBytes(total=int(typical.total * middle),
                            offloadable=int(typical.offloadable * middle))
    flops = layer_flops(job, recompute)
    norm_extra = 0.0
    if recompute.has("layernorm"):
        norm_extra = 2 * NORM_RECOMPUTE_FLOP_EQUIVALENT * job.tokens * job.sp_width
    rate = hardware.achieved_tflops * 1e12
    forward_s = job.layers_per_chunk * flops.forward / rate
    backward_s = job.layers_per_chunk * (flops.backward + norm_extra) / rate
    k = (offload_ratio(typical.offloadable, forward_s + backward_s, hardware.host_link_gbps)
         if typical.offloadable else 0.0)
    costs = CostModel(forward_time=forward_s, backward_time=backward_s, offload_ratio=k,
                      offload_share=0.5)
    return Setting(recompute=recompute, level=level, units=units, typical=typical,
                   static=[static_bytes(job, r) for r in range(p)],
                   working=[working_bytes(job, r, recompute) for r in range(p)],
                   forward_s=forward_s, backward_s=backward_s, k=k, costs=costs)


def streams_layers(job: JobSpec, setting: Setting) -> bool:
    """Whether layer streaming differs from unit offload: not under full recomputation (its
    layers keep only their checkpoint inputs, which leave with the unit)."""
    return setting.recompute.granularity != "full" and job.layers_per_chunk > 0


# ---- candidates ----------------------------------------------------------------------------------

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
    offload (the warm-up and a steady state; see
    :meth:`megatron_offload.planning.granularity.LayerSearch.layer_score`)."""
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
        group = (f" g={self.group_size}" if self.kind != "1f1b" and self.group_size is not None
                 else "")
        offload = ("no offload" if self.offload_chunks == 0
                   else f"offload chunks<{self.offload_chunks} ({self.offloaded_count} units)")
        return f"{self.kind}{group}, recompute {self.setting.recompute.label}, {offload}"

    def sort_key(self) -> tuple:
        """Tie-breaks at equal makespan: less recomputation, fewer offloaded units, Megatron's
        schedule, larger groups."""
        return (self.setting.level, self.offloaded_count, 0 if self.family == "megatron" else 1,
                -(self.group_size or 0))


def better(a: Candidate, b: Candidate | None) -> bool:
    if b is None:
        return True
    if not math.isclose(a.makespan, b.makespan, rel_tol=TOLERANCE):
        return a.makespan < b.makespan
    return a.sort_key() < b.sort_key()


def schedule_shapes(
    job: JobSpec, families: Sequence[str] = FAMILIES
) -> tuple[list[tuple[str, int | None]], list[str]]:
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
