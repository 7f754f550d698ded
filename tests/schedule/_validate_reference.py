"""The dry run as first written (before the flat-table version in validate.py): the oracle
for tests/schedule/test_fast_paths.py."""
from __future__ import annotations

from megatron_offload.schedule.ir import Schedule


def find_deadlock(schedule: Schedule) -> dict[int, int]:
    """Dry run with asynchronous sends: each rank runs ops while their inputs exist.
    Returns {rank: step it waits at} for the ranks that never finish ({} = no deadlock).
    Assumes the structure check passed. Inlines :func:`ir.producer` on op codes for speed:
    a producer's code is the op's own code, or one chunk (m codes) away across the wrap."""
    pp, m = schedule.pp, schedule.microbatches
    units = schedule.units_per_rank
    program = schedule.program()
    done = [bytearray(2 * units) for _ in range(pp)]  # per rank, F and B codes already run
    position = [0] * pp
    pending = list(range(pp))
    last = pp - 1
    while pending:
        rank = pending.pop()
        codes, mine, step = program[rank], done[rank], position[rank]
        before = done[rank - 1] if rank > 0 else done[last]  # forwards come from here
        after = done[rank + 1] if rank < last else done[0]  # backwards come from here
        start, count = step, len(codes)
        while step < count:
            code = codes[step]
            if code < units:  # forward
                if rank > 0:
                    if not before[code]:
                        break
                elif code >= m and not before[code - m]:
                    break
                mine[code] = 1
            elif code < 2 * units:  # backward
                if rank < last:
                    if not after[code]:
                        break
                elif code < 2 * units - m and not after[code + m]:
                    break
                mine[code] = 1
            step += 1
        position[rank] = step
        if step != start:  # only neighbours (and the wrap-around pair) can have been waiting on us
            for other in {rank - 1, rank + 1, 0, last}:
                if (
                    0 <= other < pp
                    and other != rank
                    and position[other] < len(program[other])
                    and other not in pending
                ):
                    pending.append(other)
    return {rank: position[rank] for rank in range(pp) if position[rank] < len(program[rank])}
