"""The planner's answer: :class:`Plan` (the chosen candidate, its predictions at the chosen
granularity, the budgets, why, and what is missing when nothing fits) and :class:`Remedy` (a
change to the job that makes it fit). Built by :func:`megatron_offload.planning.search.plan_job`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_offload.planning.candidates import Candidate, Granularity, LayerScore, streams_layers
from megatron_offload.planning.costmodel import GiB
from megatron_offload.planning.hardware import Hardware
from megatron_offload.planning.job import JobSpec, Recompute
from megatron_offload.schedule.ir import Schedule


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
    host memory) are those of this granularity. See
    :func:`megatron_offload.planning.search.plan_job` for the rule."""
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
        return (self.chosen.layer.chunks if self.granularity == "layer"
                else self.chosen.offload_chunks)

    @property
    def layer(self) -> LayerScore | None:
        """The chosen candidate at layer granularity (None when not scored)."""
        return None if self.chosen is None else self.chosen.layer

    @property
    def activation_bytes(self) -> list[float]:
        """Per rank, the predicted peak of saved activations at the chosen granularity."""
        chosen = self.chosen or self.baseline
        return (chosen.layer.activation_bytes if self.granularity == "layer"
                else chosen.activation_bytes)

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
        return (chosen.layer.host_bytes_per_node if self.granularity == "layer"
                else chosen.host_bytes_per_node)

    def granularity_peaks(self) -> dict[str, list[float] | None]:
        """Per rank peak activation bytes at each granularity: ``unit`` always; ``layer`` when
        scored, equal to ``unit`` when nothing streams (no offload, or full recomputation,
        whose layers keep only their checkpoint inputs), else None (not scored)."""
        chosen = self.chosen or self.baseline
        layer = None
        if chosen.layer is not None:
            layer = chosen.layer.activation_bytes
        elif chosen.offload_chunks == 0 or not streams_layers(self.job, chosen.setting):
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
        return (f"{shape}, stream the layers of chunks<{chosen.layer.chunks} "
                f"({sum(chosen.layer.streamed_units)} units)")

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
        slowdown = lambda makespan: (  # noqa: E731
            round(makespan / self.baseline_iteration_time_s - 1.0, 5))
        # At layer granularity: the layer score; when nothing streams (peaks["layer"] is the
        # unit's), the unit plan's; when not scored, None.
        layer_memory = (layer.memory_bytes if layer is not None
                        else None if peaks["layer"] is None else chosen.memory_bytes)
        layer_time = (layer.makespan if layer is not None
                      else None if peaks["layer"] is None else chosen.makespan)
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
            # beyond the keys promised to users (README, "Planning a job")
            "granularity": self.granularity,
            "granularity_reason": self.granularity_reason,
            "predicted_peak_activation_gib_unit": gib(peaks["unit"]),
            "predicted_peak_activation_gib_layer": (None if peaks["layer"] is None
                                                    else gib(peaks["layer"])),
            "predicted_peak_memory_gib_unit": gib(chosen.memory_bytes),
            "predicted_peak_memory_gib_layer": None if layer_memory is None else gib(layer_memory),
            "predicted_slowdown_unit": slowdown(chosen.makespan),
            "predicted_slowdown_layer": None if layer_time is None else slowdown(layer_time),
            "layer_streaming": None if layer is None else {
                "chunks": layer.chunks, "streamed_units_per_rank": layer.streamed_units,
                "offloaded_units_per_rank": layer.offloaded_units,
                "copies_per_rank_simulated": layer.copies,
                "stall_s_per_rank": [round(x, 6) for x in layer.stall_s],
                "slowdown_vs_no_copies": round(layer.slowdown, 5),
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
                "change": self.remedy.change, "flags": self.remedy.flags,
                "extra_gpus": self.remedy.extra_gpus, "schedule": self.remedy.plan.schedule_kind,
                "group_size": self.remedy.plan.group_size,
                "offload_chunks": self.remedy.plan.offload_chunks,
                "recompute": self.remedy.plan.recompute.label,
                "iteration_time_s": round(self.remedy.plan.iteration_time_s, 6),
                "predicted_peak_memory_gib": gib(
                    (self.remedy.plan.chosen or self.remedy.plan.baseline).memory_bytes),
            },
            "remedies_tried": self.remedies_tried,
            "pp": self.job.pp, "vpp": self.job.vpp, "tp": self.job.tp,
            "cp": self.job.context_parallel_size, "dp": self.job.data_parallel_size,
            "microbatches": self.job.microbatches,
            "hardware": self.hardware.name,
            "reasons": self.reasons,
            "notes": self.notes,
            "planning_s": round(self.planning_s, 4),
            "candidates_evaluated": self.evaluated,
            "layer_scores": self.layer_scores,
        }
