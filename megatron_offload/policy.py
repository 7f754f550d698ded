"""Offload policy: which (chunk, microbatch) units leave the device. Decisions only, no bytes.

The runtime (``runtime/offloader.py``) moves whatever set this returns; a later planner can
replace these rules without touching the mechanism.
"""
from __future__ import annotations

from collections.abc import Sequence

from megatron_offload.config import OffloadConfig
from megatron_offload.schedule.ir import Op, OpKind, Schedule

UnitKey = tuple[int, int]


def unit_lifespans(order: Sequence[Op]) -> dict[UnitKey, int]:
    """Ops run between each unit's forward and its backward on this rank.

    A unit whose backward directly follows its forward has lifespan 0: offloading it cannot
    free anything, since it would have to come back before any other op ran.
    """
    forward_at: dict[UnitKey, int] = {}
    lifespans: dict[UnitKey, int] = {}
    for position, op in enumerate(order):
        if op.kind is OpKind.FORWARD:
            forward_at[op.unit] = position
        elif op.kind is OpKind.BACKWARD:
            lifespans[op.unit] = position - forward_at[op.unit] - 1
    return lifespans


def units_to_offload(order: Sequence[Op], config: OffloadConfig) -> set[UnitKey]:
    """``none``: nothing. ``full``: every unit with a lifespan. ``chunks``: units of chunks < K
    (chunk 0 runs its forward first and its backward last: the longest-lived first).
    ``auto`` depends on bytes and a budget, not on rules: :func:`planner.choose_offload_units`."""
    if config.policy == "auto":
        raise ValueError(
            "--offload-policy auto has no fixed rule: its units come from the planner "
            "(megatron_offload.planner.choose_offload_units) at the first training call"
        )
    return {
        unit
        for unit, lifespan in unit_lifespans(order).items()
        if lifespan > 0 and config.offloads_chunk(unit[0])
    }


def runtime_rank_ops(order: Sequence[Op], offload: set[UnitKey], prefetch_distance: int = 1) -> list[Op]:
    """One rank's ops with offload/reload inserted where the runtime issues them.

    The runtime (``runtime/offloader.py``) starts a unit's offload right after its forward and
    its reload when the op ``prefetch_distance`` places before the unit's backward starts. The
    same rule as data, so the simulator and the renderer score the schedule that runs.
    """
    compute = [op for op in order if op.kind in (OpKind.FORWARD, OpKind.BACKWARD)]
    ops: list[Op] = []
    reloaded: set[UnitKey] = set()
    for position, op in enumerate(compute):
        ahead = compute[position : position + 1 + prefetch_distance]
        for later in ahead:
            if later.kind is OpKind.BACKWARD and later.unit in offload and later.unit not in reloaded:
                reloaded.add(later.unit)
                ops.append(Op(OpKind.RELOAD, *later.unit))
        ops.append(op)
        if op.kind is OpKind.FORWARD and op.unit in offload:
            ops.append(Op(OpKind.OFFLOAD, *op.unit))
    return ops


def runtime_schedule(compute: Schedule, config: OffloadConfig) -> Schedule:
    """``compute`` (F/B only) with the copies the runtime makes under ``config``'s policy."""
    ranks = tuple(
        tuple(runtime_rank_ops(ops, units_to_offload(ops, config), config.prefetch_distance))
        for ops in compute.ranks
    )
    return Schedule(ranks, compute.vpp, compute.microbatches, compute.kind, compute.group_size)
