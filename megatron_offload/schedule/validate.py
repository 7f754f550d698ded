"""Schedule validation: structure, p2p message order, and deadlock freedom.

The executor contract assumed here (the runtime implements it): a rank runs its ops in list
order; a compute op's output is sent to its consumer with a non-blocking send posted as soon as
the op ends and never waited on before the next op; a receive is waited on right before the op
that consumes it; messages on one directed channel (sender, receiver, activations or
gradients) are matched in posting order. Under that contract a schedule runs to completion iff

1. every unit's ops on its rank come in order F, [O, R], B, each exactly once;
2. on every channel the receiver consumes messages in the order the sender produces them;
3. the dry run below, where an op may run once its producer has run, finishes every rank.

Errors are :class:`ScheduleError` with the rank-by-step grid, the failing steps marked.
"""
from __future__ import annotations

import numpy as np

from .ir import KIND_B, KIND_F, KIND_O, KIND_R, Schedule, ScheduleError, format_grid

_ORDER = {KIND_F: 0, KIND_O: 1, KIND_R: 2, KIND_B: 3}
_NAMES = {KIND_F: "forward", KIND_B: "backward", KIND_O: "offload", KIND_R: "reload"}


def _fail(schedule: Schedule, marks: dict[int, int], message: str) -> None:
    raise ScheduleError(f"{message}\n{format_grid(schedule, marks)}")


def validate_schedule(schedule: Schedule) -> None:
    _check_structure(schedule)
    _check_channel_order(schedule)
    _check_progress(schedule)


def _check_structure(schedule: Schedule) -> None:
    vpp, m = schedule.vpp, schedule.microbatches
    units = vpp * m
    for rank, ops in enumerate(schedule.ranks):
        for step, op in enumerate(ops):
            if not (0 <= op.chunk < vpp and 0 <= op.microbatch < m):
                _fail(schedule, {rank: step}, f"rank {rank} step {step}: {op} is outside chunks 0..{vpp - 1} / microbatches 0..{m - 1}")
        stage = [-1] * units  # last op kind seen per unit, as its position in F, O, R, B
        where = [0] * units
        for step, code in enumerate(schedule.program()[rank]):
            kind, unit = divmod(code, units)
            order = _ORDER[kind]
            previous = stage[unit]
            # O and R are optional, but come as a pair; F must be first and B last.
            ok = (order == 0 and previous == -1) or (order == 3 and previous in (0, 2)) or (
                order in (1, 2) and previous == order - 1
            )
            if not ok:
                before = "nothing" if previous == -1 else _NAMES[[k for k, o in _ORDER.items() if o == previous][0]]
                _fail(schedule, {rank: step}, f"rank {rank} step {step}: {ops[step]} ({_NAMES[kind]}) follows {before} of its unit; each unit needs F, then optionally O and R, then B, each once")
            stage[unit], where[unit] = order, step
        for unit, order in enumerate(stage):
            if order != 3:
                chunk, mb = divmod(unit, m)
                mark = {rank: where[unit]} if order >= 0 else {}
                _fail(schedule, mark, f"rank {rank}: unit (chunk {chunk}, microbatch {mb}) never gets its {'forward' if order < 0 else 'backward'}; every rank runs F and B of all {units} units")


def _check_channel_order(schedule: Schedule) -> None:
    pp, m = schedule.pp, schedule.microbatches
    units = schedule.units_per_rank
    if pp == 1:
        return  # no p2p at all: the dry run checks the on-rank order
    program = schedule.program()
    forwards = [[c for c in codes if c < units] for codes in program]
    backwards = [[c for c in codes if units <= c < 2 * units] for codes in program]
    # (sender, receiver, kind, codes as sent, producer codes as consumed, consumer - producer code)
    channels = []
    for rank in range(pp - 1):
        channels.append((rank, rank + 1, KIND_F, forwards[rank], forwards[rank + 1], 0))
        channels.append((rank + 1, rank, KIND_B, backwards[rank + 1], backwards[rank], 0))
    # Across the wrap: the last rank's chunk c feeds chunk c + 1 on rank 0, and back.
    channels.append((pp - 1, 0, KIND_F, [c for c in forwards[pp - 1] if c < units - m], [c - m for c in forwards[0] if c >= m], m))
    channels.append((0, pp - 1, KIND_B, [c for c in backwards[0] if c >= units + m], [c + m for c in backwards[pp - 1] if c < 2 * units - m], -m))
    for sender, receiver, kind, sent, consumed, shift in channels:
        if sent == consumed:
            continue
        index = next((i for i, (x, y) in enumerate(zip(sent, consumed)) if x != y), min(len(sent), len(consumed)))
        message = sent[index] if index < len(sent) else None
        wanted = consumed[index] if index < len(consumed) else None
        marks = {}
        if message is not None:
            marks[sender] = program[sender].index(message)
        if wanted is not None:
            marks[receiver] = program[receiver].index(wanted + shift)
        what = "activations" if kind == KIND_F else "gradients"
        _fail(
            schedule,
            marks,
            f"p2p order mismatch on rank {sender} -> rank {receiver} ({what}), message #{index}: "
            f"rank {sender} sends the output of {_describe(message, units, m)} but rank {receiver} "
            f"expects that of {_describe(wanted, units, m)}; messages are matched in posting order, "
            "so both ranks must walk this channel in the same unit order",
        )


def _describe(code: int | None, units: int, m: int) -> str:
    if code is None:
        return "nothing (no such message)"
    kind, unit = divmod(code, units)
    chunk, mb = divmod(unit, m)
    return f"{chunk}{'F' if kind == KIND_F else 'B'}{mb}"


def _check_progress(schedule: Schedule) -> None:
    stuck = find_deadlock(schedule)
    if stuck:
        _fail(schedule, stuck, "deadlock: every unfinished rank waits for an input that is never sent (marked: where each rank waits)")


def input_slots(codes: np.ndarray, rank: int, pp: int, units: int, m: int, none: int) -> np.ndarray:
    """For each op code of ``rank``, the slot of the op producing its p2p input, vectorized.

    Slots number the compute ops of all ranks: ``rank * 2 * units + code``. Ops without a p2p
    input (copies, the first forward stage, the last backward stage) get ``none``. This is
    :func:`ir.producer` on op codes: a producer's code is the op's own code, or one chunk
    (m codes) away across the wrap between the last and the first rank.
    """
    width = 2 * units
    last = pp - 1
    forward, backward = codes < units, (codes >= units) & (codes < width)
    dep = np.full(len(codes), none, dtype=np.int64)
    if rank > 0:
        dep[forward] = (rank - 1) * width + codes[forward]
    else:
        has = forward & (codes >= m)
        dep[has] = last * width + codes[has] - m
    if rank < last:
        dep[backward] = (rank + 1) * width + codes[backward]
    else:
        has = backward & (codes < width - m)
        dep[has] = codes[has] + m  # rank 0's slots start at 0
    return dep


def find_deadlock(schedule: Schedule) -> dict[int, int]:
    """Dry run with asynchronous sends: each rank runs ops while their inputs exist.
    Returns {rank: step it waits at} for the ranks that never finish ({} = no deadlock).
    Assumes the structure check passed. Inlines :func:`ir.producer` on op codes for speed:
    a producer's code is the op's own code, or one chunk (m codes) away across the wrap.

    Per step the input's and the output's slot in one flat table of "done" flags are
    precomputed (numpy); copies (O, R) and ops without a p2p input read an always-set slot.
    A blocked rank is only woken once the slot it waits on is set."""
    pp, m = schedule.pp, schedule.microbatches
    units = schedule.units_per_rank
    program = schedule.program()
    width = 2 * units
    always = pp * width  # the always-set slot; a write slot for copies is after it
    done = bytearray(always + 2)
    done[always] = 1
    last = pp - 1
    deps, outs = [], []
    for rank, row in enumerate(program):
        codes = np.asarray(row, dtype=np.int64).reshape(-1)
        dep = input_slots(codes, rank, pp, units, m, always)
        out = np.where(codes < width, rank * width + codes, always + 1)
        deps.append(dep.tolist())
        outs.append(out.tolist())
    lengths = [len(codes) for codes in program]
    position = [0] * pp
    waiting = [always] * pp
    queued = bytearray([1]) * pp
    neighbours = [tuple(sorted({rank - 1, rank + 1, 0, last} - {rank, -1, pp})) for rank in range(pp)]
    pending = list(range(pp))
    while pending:
        rank = pending.pop()
        queued[rank] = 0
        dep, out = deps[rank], outs[rank]
        begin, count = position[rank], lengths[rank]
        step = begin
        for step in range(begin, count):
            if not done[dep[step]]:
                break
            done[out[step]] = 1
        else:
            step = count
        position[rank] = step
        if step < count:
            waiting[rank] = dep[step]
        if step != begin:  # only neighbours (and the wrap-around pair) can have been waiting on us
            for other in neighbours[rank]:
                if not queued[other] and position[other] < lengths[other] and done[waiting[other]]:
                    queued[other] = 1
                    pending.append(other)
    return {rank: position[rank] for rank in range(pp) if position[rank] < lengths[rank]}
