"""Megatron-Core's pipeline orders (0.16.1 to 0.19.2), reproduced op for op.

What ``forward_backward_pipelining_without_interleaving`` (1F1B) and
``forward_backward_pipelining_with_interleaving`` run on each rank, read from
megatron/core/pipeline_parallel/schedules.py (0.16.1; ``get_pp_rank_microbatches`` and
``get_schedule_table`` are unchanged through 0.19.2, and tests/integration/test_megatron_exact.py
checks these orders against the installed release's functions on every environment):

- 1F1B: ``min(p - r - 1, m)`` warm-up forwards, then forward/backward pairs, then the
  cool-down backwards; microbatches in order.
- Interleaved: forward k runs table[k] of ``get_schedule_table`` (groups of g microbatches,
  chunk-major inside a group); backward k runs chunk ``v - 1 - chunk(table[k])`` on the
  microbatch of table[k] (per-chunk FIFO); ``get_pp_rank_microbatches`` gives
  ``2 (p - r - 1) + (v - 1) g`` warm-up forwards (capped at m v); each steady step runs its
  forward before its backward.

The table and the warm-up/alternate/cool-down walk are shared with :mod:`gis`, which differs
only in the warm-up count and in the group sizes it accepts.
"""
from __future__ import annotations

from typing import Literal

from .ir import B, F, Op, Schedule

MegatronKind = Literal["1f1b", "interleaved"]


def group_table(microbatches: int, vpp: int, group_size: int) -> list[tuple[int, int]]:
    """Forward order as (chunk, microbatch): Megatron's ``get_schedule_table`` (which yields
    (microbatch, chunk)). Microbatches go in groups of g, each group through chunk 0, 1, ...;
    the last group takes whatever is left (never more than g)."""
    table = []
    for first in range(0, microbatches, group_size):
        last = min(first + group_size, microbatches)
        table.extend((chunk, mb) for chunk in range(vpp) for mb in range(first, last))
    return table


def warmup_then_alternate(table: list[tuple[int, int]], vpp: int, warmup: int,
                          ops: dict | None = None) -> list[Op]:
    """The walk all three schedules share: ``warmup`` forwards, then forward k + warmup
    followed by backward k, then the remaining backwards. Backward k mirrors forward k's
    chunk (v - 1 - c) on the same microbatch. ``ops`` interns Op objects across ranks."""
    total = len(table)
    warmup = min(warmup, total)
    ops = {} if ops is None else ops
    forwards = [_interned(ops, F, c, mb) for c, mb in table]
    backwards = [_interned(ops, B, vpp - 1 - c, mb) for c, mb in table]
    order = forwards[:warmup]
    for k in range(total - warmup):
        order.append(forwards[k + warmup])
        order.append(backwards[k])
    order.extend(backwards[total - warmup :])
    return order


def _interned(ops: dict, make, chunk: int, microbatch: int) -> Op:
    # Ops are immutable: one object per (kind, chunk, microbatch) serves every rank, which
    # keeps large schedules (p=64, v=8, m=512: half a million ops) cheap to build and hash.
    key = (make, chunk, microbatch)
    op = ops.get(key)
    if op is None:
        op = ops[key] = make(chunk, microbatch)
    return op


def check_pipeline_shape(pp: int, vpp: int, microbatches: int) -> None:
    """What any pipeline schedule needs, whatever generates it."""
    if pp < 1:
        raise ValueError(f"--pp {pp} must be >= 1 (pipeline-parallel ranks)")
    if vpp < 1:
        raise ValueError(f"--vpp {vpp} must be >= 1 (model chunks per rank; 1 = no interleaving)")
    if microbatches < 1:
        raise ValueError(f"--microbatches {microbatches} must be >= 1")


def check_megatron_args(kind: str, pp: int, vpp: int, microbatches: int,
                        group_size: int | None) -> int:
    """Refuse what Megatron-Core 0.16.1 refuses (plus what cannot be a pipeline at all), naming
    the flag and the fix. Returns the group size in effect (Megatron's default g = p)."""
    check_pipeline_shape(pp, vpp, microbatches)
    if kind == "1f1b":
        if vpp != 1:
            raise ValueError(f"--schedule 1f1b runs one model chunk per rank but --vpp is {vpp}; "
                             f"use --vpp 1, or --schedule interleaved / gis for {vpp} chunks")
        return 1 if group_size is None else group_size
    if kind != "interleaved":
        raise ValueError(
            f"--schedule {kind!r} is not a Megatron schedule; choose 1f1b or interleaved")
    if pp < 2:
        raise ValueError("--schedule interleaved needs --pp >= 2 (with one rank Megatron runs no "
                         "pipeline schedule); raise --pp or use --schedule gis")
    group = pp if group_size is None else group_size
    if not pp <= group <= microbatches:
        if microbatches < pp:
            raise ValueError(f"--schedule interleaved needs --microbatches >= --pp ({microbatches} "
                             f"< {pp}); raise --microbatches to at least {pp}, or use --schedule "
                             "gis")
        raise ValueError(f"--group-size {group} must lie in [--pp, --microbatches] = [{pp}, "
                         f"{microbatches}] for Megatron's interleaved schedule; pick a value in "
                         "that range, or use --schedule gis for g < p")
    remainder = microbatches % group
    if 0 < remainder < pp:
        raise ValueError(
            f"--microbatches {microbatches} leaves a last group of {remainder} < --pp {pp} "
            f"microbatches with --group-size {group}, which Megatron refuses; use --microbatches "
            f"{microbatches - remainder} or {microbatches - remainder + group}, or another "
            "--group-size"
        )
    return group


def megatron_warmup(kind: str, pp: int, rank: int, vpp: int, microbatches: int,
                    group_size: int) -> int:
    """Warm-up forwards on ``rank``: Megatron's ``get_pp_rank_microbatches`` (capped at m v)."""
    if kind == "1f1b":
        return min(pp - rank - 1, microbatches)
    return min(2 * (pp - rank - 1) + (vpp - 1) * group_size, microbatches * vpp)


def megatron_order(kind: MegatronKind, pp: int, rank: int, vpp: int, microbatches: int,
                   group_size: int | None = None, *, _ops: dict | None = None) -> list[Op]:
    """The op order Megatron-Core 0.16.1 runs on pipeline rank ``rank`` (the runtime checks
    its order against this). ``kind``: ``1f1b`` (vpp must be 1) or ``interleaved``."""
    group = check_megatron_args(kind, pp, vpp, microbatches, group_size)
    if not 0 <= rank < pp:
        raise ValueError(f"rank {rank} is outside 0..{pp - 1}")
    table = group_table(microbatches, vpp, microbatches if kind == "1f1b" else group)
    return warmup_then_alternate(table, vpp,
                                 megatron_warmup(kind, pp, rank, vpp, microbatches, group), _ops)


def megatron_schedule(kind: MegatronKind, pp: int, vpp: int, microbatches: int,
                      group_size: int | None = None) -> Schedule:
    """All ranks of :func:`megatron_order` as one :class:`Schedule`."""
    group = check_megatron_args(kind, pp, vpp, microbatches, group_size)
    ops: dict = {}
    ranks = tuple(tuple(megatron_order(kind, pp, r, vpp, microbatches, group, _ops=ops))
                  for r in range(pp))
    return Schedule(ranks, vpp, microbatches, kind, None if kind == "1f1b" else group)
