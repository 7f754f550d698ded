"""Memory budget -> Plan: schedule, group size, what to offload, recompute fallback, predictions.

:func:`plan_job` searches, for one job (:class:`~megatron_offload.planning.job.JobSpec`) on one kind
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

The pieces: :mod:`.candidates` (what is scored: recompute settings, candidates, the ladder and
the schedule shapes), :mod:`.unit_search` (the search at unit granularity),
:mod:`.granularity` (layer streaming), :mod:`.plan` (the answer), :mod:`.remedies` (changes
that make a job fit) and :mod:`.reasons` (why). :func:`auto_for_plan` runs policy auto's
selection (:mod:`.auto`) for a plan's job.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from megatron_offload.planning.auto import AutoOffloadPlan, plan_auto_offload
from megatron_offload.planning.candidates import (
    FAMILIES,
    GRANULARITIES,
    Setting,
    recompute_ladder,
    schedule_shapes,
)
from megatron_offload.planning.costmodel import (
    DEFAULT_MIN_OFFLOAD_BYTES,
    GiB,
    overhead_bytes,
    unit_bytes,
)
from megatron_offload.planning.granularity import (
    DEFAULT_LAYER_SLOWDOWN_TOLERANCE,
    LayerSearch,
    layer_floor,
)
from megatron_offload.planning.hardware import Hardware, host_memory_from_proc
from megatron_offload.planning.job import JobSpec
from megatron_offload.planning.plan import Plan
from megatron_offload.planning.reasons import plan_reasons
from megatron_offload.planning.remedies import find_remedy
from megatron_offload.schedule.simulate import simulate


def default_reserve_gib(gpu_memory_gib: float) -> float:
    """GPU memory kept out of the budget: ~2 GiB of CUDA context, NCCL and cuBLAS workspaces,
    plus 5% for the caching allocator's fragmentation."""
    return 2.0 + 0.05 * gpu_memory_gib


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

    **Granularity** (``--offload-granularity``). The search above runs at unit granularity. Then,
    with ``layer`` allowed (at most :data:`.granularity.LAYER_SCORES_PER_PLAN` layer simulations,
    each :meth:`LayerSearch.layer_score`: the cost model's bytes per layer, per-layer times from the
    FLOPs, the host link's GB/s, reloads as late as the link allows and copies it cannot hide
    dropped):

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
        raise ValueError(f"--offload-schedule {','.join(sorted(unknown)) or '(none)'}: "
                         f"choose from {', '.join(FAMILIES)}")
    budget, reserve_bytes = _gpu_budget(hardware, memory_budget_gib, reserve_gib)
    host_gib, host_source = _host_memory(hardware, host_memory_gib)
    host_budget = host_gib * GiB * host_memory_fraction
    calibration = (None if measured_unit_bytes is None
                   else _calibration(job, measured_unit_bytes, min_offload_bytes))

    granularities = tuple(granularities)
    if "unit" not in granularities or set(granularities) - set(GRANULARITIES):
        raise ValueError(f"--offload-granularity {','.join(granularities)}: plan with unit, "
                         "or unit and layer")
    search = LayerSearch(job, hardware, budget, host_budget, min_offload_bytes, calibration,
                         layer_tolerance=layer_slowdown_tolerance)
    shapes, notes = schedule_shapes(job, families)
    if not shapes:
        raise ValueError("no schedule can run this job: " + "; ".join(notes)
                         + " (allow --offload-schedule gis, or change "
                         "--global-batch-size / --micro-batch-size)")
    ladder = recompute_ladder(job) if allow_recompute else [job.recompute]
    # The job as given, for "without the plan" and the slowdown.
    own_shapes, own_notes = schedule_shapes(job, ("megatron",))
    own_kind, own_group = own_shapes[0] if own_shapes else shapes[0]
    own_setting = search.setting(job.recompute, 0)
    own_sim = simulate(search.schedule(own_kind, own_group), own_setting.costs)
    baseline = search.score(own_kind, own_group, own_setting, own_sim, 0,
                            [[] for _ in range(job.pp)])
    search.scored.clear()

    # Recompute levels whose floor (static + working + one unit) is over budget on some rank
    # cannot fit whatever the schedule and offload: not simulated.
    settings = [search.setting(recompute, level) for level, recompute in enumerate(ladder)]
    viable = [setting for setting in settings if max(setting.floor) <= budget]
    best, combos = search.run(shapes, viable)
    granularity, granularity_reason = "unit", "unit: --offload-granularity unit"
    if "layer" in granularities:
        # With layer streaming a rank can hold less than a whole unit: static + working + one layer.
        layer_viable = [setting for setting in settings
                        if max(layer_floor(job, setting, min_offload_bytes)) <= budget]
        best, granularity, granularity_reason = search.choose_granularity(
            best, shapes, layer_viable, refine=layer_refine)
    scored = sorted(search.scored, key=lambda c: (not c.fits, c.makespan, c.sort_key()))
    plan = Plan(job=job, hardware=hardware, fits=best is not None, chosen=best, baseline=baseline,
                budget_bytes=budget, reserve_bytes=reserve_bytes,
                host_budget_bytes_per_node=host_budget, host_memory_source=host_source,
                missing_bytes=0.0, missing_host_bytes_per_node=0.0, remedy=None, remedies_tried=[],
                reasons=[], alternatives=[c for c in scored if c is not best][:8],
                notes=notes + [n for n in own_notes if n not in notes],
                granularity=granularity, granularity_reason=granularity_reason)
    lowest = min(settings, key=lambda setting: max(setting.floor))
    plan.floor_bytes = lowest.floor
    if best is None:
        _closest(plan, search, lowest)
        if remedies:
            plan.remedy, plan.remedies_tried = find_remedy(
                job, hardware, plan_job, memory_budget_gib=memory_budget_gib,
                reserve_gib=reserve_gib, host_memory_gib=host_gib,
                host_memory_fraction=host_memory_fraction, families=families,
                allow_recompute=allow_recompute, min_offload_bytes=min_offload_bytes,
                granularities=("unit",))
    plan.evaluated = len(search.scored)
    plan.layer_scores = search.layer_runs
    plan.reasons = plan_reasons(plan, combos)
    plan.planning_s = time.perf_counter() - started
    return plan


def _gpu_budget(hardware: Hardware, memory_budget_gib: float | None,
                reserve_gib: float | None) -> tuple[float, float]:
    """(GPU budget, reserve) in bytes: ``memory_budget_gib`` when given (the reserve is what it
    leaves of the GPU's memory), else GPU memory minus ``reserve_gib`` (default
    :func:`default_reserve_gib`)."""
    reserve = default_reserve_gib(hardware.gpu_memory_gib) if reserve_gib is None else reserve_gib
    if memory_budget_gib is not None:
        if not memory_budget_gib > 0:
            raise ValueError(f"--memory-budget-gib {memory_budget_gib} must be > 0")
        budget = memory_budget_gib * GiB
        return budget, max(0.0, hardware.gpu_memory_gib * GiB - budget)
    if not 0 <= reserve < hardware.gpu_memory_gib:
        raise ValueError(f"--memory-reserve-gib {reserve} must lie in [0, GPU memory "
                         f"{hardware.gpu_memory_gib:g} GiB)")
    return (hardware.gpu_memory_gib - reserve) * GiB, reserve * GiB


def _host_memory(hardware: Hardware, host_memory_gib: float | None) -> tuple[float, str]:
    """(host RAM per node in GiB, where it comes from): ``host_memory_gib``, the hardware's,
    else this machine's /proc/meminfo."""
    if host_memory_gib is not None:
        return host_memory_gib, "--host-memory-gib"
    if hardware.host_memory_gib is not None:
        return hardware.host_memory_gib, f"hardware {hardware.name}"
    host_gib = host_memory_from_proc()
    if host_gib is None:
        raise ValueError("host RAM unknown: give --host-memory-gib (RAM per node)")
    return host_gib, "/proc/meminfo of this machine"


def _calibration(job: JobSpec, measured_unit_bytes: Sequence[Sequence[float]],
                 min_offload_bytes: int) -> list[list[float]]:
    """Per rank, per chunk: measured / predicted bytes of one unit at the job's own
    recomputation (1 where the cost model predicts nothing)."""
    calibration = []
    for rank in range(job.pp):
        row = []
        for chunk in range(job.vpp):
            predicted = unit_bytes(job, rank, chunk, job.recompute, min_offload_bytes).total
            row.append(float(measured_unit_bytes[rank][chunk]) / predicted if predicted else 1.0)
        calibration.append(row)
    return calibration


def _closest(plan: Plan, search: LayerSearch, lowest: Setting) -> None:
    """When nothing fits: the plan's candidate becomes the closest scored one (least over the
    GPU budget, then the host budget, then fastest) and :attr:`Plan.missing_bytes` what it
    lacks; with nothing scored (every floor over budget), the lowest floor's excess, a lower
    bound."""
    budget, host_budget = plan.budget_bytes, plan.host_budget_bytes_per_node
    if search.scored:
        closest = min(search.scored,
                      key=lambda c: (max(0.0, c.excess(budget)),
                                     max(0.0, c.host_bytes_per_node - host_budget), c.makespan))
        plan.chosen = closest
        if closest.layer is None:  # scored at layer granularity too (no new simulation)
            closest.layer = search.layer_scores.get((closest.kind, closest.group_size,
                                                     closest.setting.recompute,
                                                     closest.offload_chunks))
        plan.missing_bytes = max(0.0, closest.excess(budget))
        plan.missing_host_bytes_per_node = max(0.0, closest.host_bytes_per_node - host_budget)
    else:  # even the floor is over budget: what is missing is at least this
        plan.chosen = None
        plan.missing_bytes = max(lowest.floor) - budget
        plan.missing_is_lower_bound = True


# ---- policy auto for a plan ---------------------------------------------------------------------

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
        budget: float | list[float] = min(plan.budget_bytes - s - w
                                          for s, w in zip(static, setting.working))
        note = (f"--offload-memory-budget-gib {max(budget, 0) / GiB:.2f}: "
                f"the GPU budget {plan.budget_bytes / GiB:.2f} GiB minus static and working "
                "memory on the tightest rank")
    elif scope == "device":
        budget = [memory_budget_gib * GiB - s - w - reserve_gib * GiB
                  for s, w in zip(static, setting.working)]
        note = ("--offload-memory-budget-scope device --offload-memory-budget-gib "
                f"{memory_budget_gib:g}: per rank minus static and working memory and a "
                f"{reserve_gib:g} GiB reserve")
    elif scope == "activations":
        budget = memory_budget_gib * GiB
        note = f"--offload-memory-budget-gib {memory_budget_gib:g} (resident activations per rank)"
    else:
        raise ValueError(f"--offload-memory-budget-scope {scope!r}: choose activations or device")
    if isinstance(budget, float) and budget <= 0:
        budget = 0.0
    auto = plan_auto_offload(job, base.schedule.ranks, budget, prefetch_distance=prefetch_distance,
                             min_offload_bytes=min_offload_bytes,
                             overhead_bytes=[overhead_bytes(job, r) for r in range(job.pp)],
                             units=setting.units)
    auto.notes.append(note)
    return auto
