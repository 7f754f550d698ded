"""Why: the plan's reasons in words (budgets, k, the job as given, what was chosen and what
else fits or is faster, the granularity, what is missing and the remedy)."""
from __future__ import annotations

import math

from megatron_offload.planning.candidates import TOLERANCE
from megatron_offload.planning.costmodel import GiB
from megatron_offload.planning.plan import Plan


def plan_reasons(plan: Plan, combos) -> list[str]:
    """The reasons of :attr:`Plan.reasons` (``combos``: the combinations the search ran)."""
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    budget = plan.budget_bytes
    base = plan.baseline
    worst = max(range(len(base.memory_bytes)), key=base.memory_bytes.__getitem__)
    reasons = [f"budget {gib(budget)} per GPU ({plan.hardware.gpu_memory_gib:g} GiB - "
               f"{gib(plan.reserve_bytes)} reserve); host budget "
               f"{gib(plan.host_budget_bytes_per_node)} per node ({plan.host_memory_source})"]
    setting = base.setting
    reasons.append(f"k = {setting.k:.3f}: a unit ({plan.job.layers_per_chunk} layers, "
                   f"{gib(setting.typical.offloadable)} offloadable) takes "
                   f"{setting.typical.offloadable / plan.hardware.link_bytes_per_s * 2 * 1e3:.1f} "
                   f"ms to copy out and back, {(setting.forward_s + setting.backward_s) * 1e3:.1f} "
                   "ms to compute"
                   + (" (k <= 1: the link keeps up with compute)" if setting.k <= 1
                      else " (k > 1: only long-lived units can be hidden)"))
    verdict = "fits" if base.fits else f"needs {gib(base.memory_bytes[worst])} on rank {worst}"
    reasons.append(f"as given ({base.label()}): {verdict}")
    chosen = plan.chosen
    if chosen is None:
        rank = max(range(len(plan.floor_bytes)), key=plan.floor_bytes.__getitem__)
        reasons.append(f"does not fit: at least {gib(plan.missing_bytes)} missing on rank {rank}: "
                       "its parameters, gradients and optimizer state, working memory "
                       f"and a single unit already need {gib(plan.floor_bytes[rank])}, "
                       "whatever is offloaded or recomputed")
        reasons += _remedy_reasons(plan)
        return reasons
    if plan.fits:
        if chosen is base or ((chosen.kind, chosen.group_size, chosen.setting.level,
                               chosen.offload_chunks) == (base.kind, base.group_size, 0, 0)):
            reasons.append("chosen: the job as given, no offload needed")
        else:
            reasons.append(f"chosen: {plan.label()}: worst rank {gib(max(plan.memory_bytes))}, "
                           f"slowdown {plan.slowdown:+.2%}")
            if plan.granularity == "layer":
                layer = chosen.layer
                reasons.append("streamed units per rank: "
                               f"{', '.join(map(str, layer.streamed_units))}; "
                               "leaving the device entirely (those with a lifespan): "
                               f"{', '.join(map(str, layer.offloaded_units))}; "
                               f"host {gib(layer.host_bytes_per_node)} per node")
            elif chosen.offload_chunks:
                per_rank = ", ".join(str(len(u)) for u in chosen.offloaded)
                reasons.append(f"offloaded units per rank: {per_rank} (longest-lived first, "
                               f"chunks < {chosen.offload_chunks}); "
                               f"host {gib(chosen.host_bytes_per_node)} per node")
            if chosen.setting.level:
                reasons.append(f"recompute {chosen.setting.recompute.label}: offload alone cannot "
                               "reach the budget at this speed")
        shape = lambda c: (c.kind, c.group_size, c.setting.level)  # noqa: E731
        same = [c for c in plan.alternatives
                if c.fits and math.isclose(c.makespan, chosen.makespan, rel_tol=TOLERANCE)
                and shape(c) != shape(chosen)]
        as_given = shape(chosen) == shape(base) and chosen.offload_chunks == 0
        if same and not as_given:
            reasons.append(f"also fits at the same predicted time: {same[0].label()} (worst "
                           f"rank {gib(max(same[0].memory_bytes))}); the plan prefers less "
                           "recomputation, fewer offloaded units, then Megatron's own schedule")
        reasons.append(f"granularity {plan.granularity_reason}")
        faster = [c for c in plan.alternatives
                  if c.makespan < plan.iteration_time_s * (1 - TOLERANCE)]
        if faster:
            f = min(faster, key=lambda c: c.makespan)
            reasons.append(f"faster but over budget: {f.label()} ({gib(max(f.memory_bytes))} "
                           "on the worst rank)")
    else:
        reasons.append(f"does not fit: {gib(plan.missing_bytes)} missing on the worst rank "
                       f"even with {chosen.label()}"
                       + (f"; host memory {gib(plan.missing_host_bytes_per_node)} short per node"
                          if plan.missing_host_bytes_per_node else ""))
        reasons += _remedy_reasons(plan)
    return reasons


def _remedy_reasons(plan: Plan) -> list[str]:
    if plan.remedy is not None:
        return [f"cheapest change that fits: {plan.remedy.change} -> "
                f"{plan.remedy.plan.chosen.label()}, "
                f"{plan.remedy.plan.iteration_time_s:.3f} s per iteration"]
    if plan.remedies_tried:
        return ["no tried change fits: " + "; ".join(plan.remedies_tried)]
    return []
