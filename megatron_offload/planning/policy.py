"""Offload policy: which (chunk, microbatch) units leave the device. Decisions only, no bytes.

The runtime (``runtime/offloader.py``) moves whatever set this returns; a later planner can
replace these rules without touching the mechanism.
"""
from __future__ import annotations

from collections.abc import Sequence

from megatron_offload.config import OffloadConfig
from megatron_offload.schedule.ir import Op, Schedule, UnitKey
from megatron_offload.schedule.kinds import OpKind
from megatron_offload.schedule.layers import expand_rank, runtime_rank_ops, unit_lifespans


def units_to_offload(order: Sequence[Op], config: OffloadConfig) -> set[UnitKey]:
    """``none``: nothing. ``full``: every unit with a lifespan. ``chunks``: units of chunks < K
    (chunk 0 runs its forward first and its backward last: the longest-lived first).
    ``auto`` depends on bytes and a budget, not on rules: :func:`auto.choose_offload_units`."""
    if config.policy == "auto":
        raise ValueError(
            "--offload-policy auto has no fixed rule: its units come from the planner "
            "(megatron_offload.planning.auto.choose_offload_units) at the first training call"
        )
    return {
        unit
        for unit, lifespan in unit_lifespans(order).items()
        if lifespan > 0 and config.offloads_chunk(unit[0])
    }


def runtime_schedule(compute: Schedule, config: OffloadConfig) -> Schedule:
    """``compute`` (F/B only) with the copies the runtime makes under ``config``'s policy."""
    ranks = tuple(
        tuple(runtime_rank_ops(ops, units_to_offload(ops, config), config.unit_prefetch_distance))
        for ops in compute.ranks
    )
    return Schedule(ranks, compute.vpp, compute.microbatches, compute.kind, compute.group_size)


def streamed_units(order: Sequence[Op], config: OffloadConfig,
                   offload: set[UnitKey]) -> set[UnitKey]:
    """At layer granularity, the units whose layers stream: ``offload`` (units that leave
    entirely) plus, for ``full`` and ``chunks``, the policy's units without a lifespan, which
    still stream within their own forward and backward."""
    if config.granularity != "layer":
        return set()
    if config.policy in ("full", "chunks"):
        rule = {op.unit for op in order
                if op.kind is OpKind.FORWARD and config.offloads_chunk(op.chunk)}
        return rule | set(offload)
    return set(offload)


def runtime_plan(order: Sequence[Op], offload: set[UnitKey], config: OffloadConfig,
                 layers_per_chunk: Sequence[int] | int = 0, *, synchronous_copies: bool) -> list:
    """The list the runtime follows entry for entry in one iteration, copies included: unit
    ops (:func:`runtime_rank_ops`) at ``unit`` granularity, layer ops
    (:func:`schedule.layers.expand_rank`) at ``layer`` granularity."""
    if config.granularity != "layer":
        return runtime_rank_ops(order, offload, config.unit_prefetch_distance)
    return expand_rank(
        order, layers_per_chunk, streamed=streamed_units(order, config, offload),
        offloaded=offload,
        reload_distance=config.layer_reload_distance(synchronous_copies=synchronous_copies))
