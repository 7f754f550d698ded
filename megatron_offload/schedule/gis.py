"""Generalized interleaving (PipeOffload's GIS): Megatron's group table with any group size.

Differences from Megatron's interleaved 1F1B (see pipeoffload.md section 4):
- the group size g may be anything in 1..m (Megatron requires p <= g <= m and refuses a
  short last group);
- rank r warms up with (v - 1) g + (p - 1 - r) forwards instead of (v - 1) g + 2 (p - 1 - r),
  so rank 0 peaks at (v - 1) g + p units: p v with g = p (1F1B's level, at Megatron's
  makespan), about (v + 1) p / 2 with g = ceil(p / 2) (slower: a planner decision).
With v = 1 it is exactly 1F1B.

When groups are short against the ring (roughly g < (p - 1) / 2, or a short last group), that
warm-up followed by strict alternation would deadlock: rank 0's next forward waits for the
last rank, which waits for a backward rank 0 has not reached. Such ranks get the fewest extra
warm-up forwards that make the schedule run, found by dry run (:func:`validate.find_deadlock`);
with g >= ceil(p / 2) and full groups none are needed.
"""
from __future__ import annotations

from .ir import Op, Schedule
from .kinds import OpKind
from .megatron import check_pipeline_shape, group_table, warmup_then_alternate
from .validate import find_deadlock, validate_schedule


def check_gis_args(pp: int, vpp: int, microbatches: int, group_size: int | None) -> int:
    check_pipeline_shape(pp, vpp, microbatches)
    group = min(pp, microbatches) if group_size is None else group_size
    if not 1 <= group <= microbatches:
        raise ValueError(f"--group-size {group} must lie in 1..--microbatches ({microbatches}) for "
                         f"--schedule gis; e.g. --group-size {min(pp, microbatches)}")
    return group


def gis_warmup(pp: int, rank: int, vpp: int, microbatches: int, group_size: int) -> int:
    return min((vpp - 1) * group_size + (pp - 1 - rank), vpp * microbatches)


def gis_order(pp: int, rank: int, vpp: int, microbatches: int,
              group_size: int | None = None) -> list[Op]:
    """The GIS op order of one rank (computed with all ranks: warm-ups depend on each other)."""
    if not 0 <= rank < pp:
        raise ValueError(f"rank {rank} is outside 0..{pp - 1}")
    return list(gis_schedule(pp, vpp, microbatches, group_size).ranks[rank])


def gis_schedule(pp: int, vpp: int, microbatches: int, group_size: int | None = None) -> Schedule:
    """GIS on every rank; ``group_size`` defaults to min(p, m)."""
    group = check_gis_args(pp, vpp, microbatches, group_size)
    table = group_table(microbatches, vpp, group)
    ops: dict = {}
    warmups = [gis_warmup(pp, r, vpp, microbatches, group) for r in range(pp)]
    ranks = [warmup_then_alternate(table, vpp, w, ops) for w in warmups]
    # Always dry run (about 0.15 s at p=64, m v=4096): on Megatron's admissible shapes (g >= p,
    # no short last group) it finds nothing to fix, since Megatron's own order runs with a larger
    # warm-up skew (2 per rank) than ours (1); tests/schedule checks that exhaustively for p <= 8.
    while True:
        schedule = Schedule(tuple(map(tuple, ranks)), vpp, microbatches, "gis", group)
        stuck = find_deadlock(schedule)
        if not stuck:
            return schedule
        # A rank stuck on a backward runs one more forward first; forwards only feed forward,
        # so every deadlock has such a rank and each round makes progress (warm-up <= m v).
        waiting_on_backward = [r for r, step in stuck.items()
                               if ranks[r][step].kind is OpKind.BACKWARD]
        if not waiting_on_backward:  # cannot happen (see above); fail loudly rather than loop
            validate_schedule(schedule)
        for r in waiting_on_backward:
            warmups[r] += 1
            ranks[r] = warmup_then_alternate(table, vpp, warmups[r], ops)
