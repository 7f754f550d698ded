"""Offload policy: which (chunk, microbatch) units leave the device. Decisions only, no bytes.

The runtime (``runtime/offloader.py``) moves whatever set this returns; a later planner can
replace these rules without touching the mechanism.
"""
from __future__ import annotations

from collections.abc import Sequence

from megatron_offload.config import OffloadConfig
from megatron_offload.schedule.ir import Op, OpKind

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
    (chunk 0 runs its forward first and its backward last: the longest-lived first)."""
    return {
        unit
        for unit, lifespan in unit_lifespans(order).items()
        if lifespan > 0 and config.offloads_chunk(unit[0])
    }
