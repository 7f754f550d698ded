"""Schedule validation: structure, p2p message order, and deadlock freedom.

The executor contract assumed here (the runtime implements it): a rank runs its ops in list
order; a compute op's output is sent to its consumer with a non-blocking send posted as soon as
the op ends and never waited on before the next op; a receive is waited on right before the op
that consumes it; messages on one directed channel (sender, receiver, activations or
gradients) are matched in posting order. Under that contract a schedule runs to completion iff

1. every unit's ops on its rank come in an order the op-kind table allows (:mod:`.kinds`, the
   ``after`` and ``closes`` columns; today F, [O, R], B), each kind at most once;
2. on every channel the receiver consumes messages in the order the sender produces them;
3. the dry run below, where an op may run once its producer has run, finishes every rank.

Errors are :class:`ScheduleError` with the rank-by-step grid, the failing steps marked.
"""
from __future__ import annotations

import numpy as np

from .ir import Schedule, ScheduleError, format_grid
from .kinds import FIRST_COPY_CODE, KIND_BY_CODE, Flow, OpKind, unit_life

# _ALLOWED[previous][kind]: may an op of kind code `kind` be its unit's next op after one of
# kind code `previous` (_NOTHING: the unit's first op)? From the table's `after` column.
_NOTHING = len(OpKind)
_ALLOWED = ([[before.value in kind.after for kind in OpKind] for before in OpKind]
            + [[not kind.after for kind in OpKind]])
_CLOSES = [kind.closes for kind in OpKind] + [False]
_OPENING = " or ".join(kind.word for kind in OpKind if not kind.after)
_CLOSING = " or ".join(kind.word for kind in OpKind if kind.closes)
_REQUIRED = " and ".join(
    [kind.value for kind in OpKind if not kind.after]
    + [kind.value for kind in OpKind if kind.closes]
)
_SENDING = tuple(kind for kind in OpKind if kind.sends is not None)


def _fail(schedule: Schedule, marks: dict[int, int], message: str) -> None:
    raise ScheduleError(f"{message}\n{format_grid(schedule, marks)}")


def validate_schedule(schedule: Schedule) -> Schedule:
    """Raise :class:`ScheduleError` (with the rank-by-step grid) unless ``schedule`` is valid;
    return it."""
    _check_structure(schedule)
    _check_channel_order(schedule)
    _check_progress(schedule)
    return schedule


def _check_structure(schedule: Schedule) -> None:
    vpp, m = schedule.vpp, schedule.microbatches
    units = vpp * m
    allowed, closes = _ALLOWED, _CLOSES
    for rank, ops in enumerate(schedule.ranks):
        for step, op in enumerate(ops):
            if not (0 <= op.chunk < vpp and 0 <= op.microbatch < m):
                _fail(schedule, {rank: step},
                      f"rank {rank} step {step}: {op} is outside chunks 0..{vpp - 1} / "
                      f"microbatches 0..{m - 1}")
        last = [_NOTHING] * units  # code of the last op kind seen per unit
        where = [0] * units
        for step, code in enumerate(schedule.program()[rank]):
            kind, unit = divmod(code, units)
            previous = last[unit]
            if not allowed[previous][kind]:
                before = "nothing" if previous == _NOTHING else KIND_BY_CODE[previous].word
                _fail(schedule, {rank: step},
                      f"rank {rank} step {step}: {ops[step]} ({KIND_BY_CODE[kind].word}) follows "
                      f"{before} of its unit; {unit_life()}")
            last[unit], where[unit] = kind, step
        for unit, kind in enumerate(last):
            if not closes[kind]:
                chunk, mb = divmod(unit, m)
                mark = {rank: where[unit]} if kind != _NOTHING else {}
                _fail(schedule, mark,
                      f"rank {rank}: unit (chunk {chunk}, microbatch {mb}) never gets its "
                      f"{_OPENING if kind == _NOTHING else _CLOSING}; every rank runs {_REQUIRED} "
                      f"of all {units} units")


def _check_channel_order(schedule: Schedule) -> None:
    pp, m = schedule.pp, schedule.microbatches
    units = schedule.units_per_rank
    if pp == 1:
        return  # no p2p at all: the dry run checks the on-rank order
    program = schedule.program()
    # Per kind that sends, each rank's codes of that kind in list order: the messages it sends
    # along the kind's flow, and (as their producers' codes) the ones it receives.
    sent = {kind: _codes_between(program, kind.code * units, (kind.code + 1) * units)
            for kind in _SENDING}
    # (sender, receiver, kind, codes as sent, producer codes as consumed, consumer - producer code)
    channels = []
    for rank in range(pp - 1):
        for kind in _SENDING:
            up, down = sent[kind][rank], sent[kind][rank + 1]
            if kind.sends is Flow.DOWNSTREAM:
                channels.append((rank, rank + 1, kind, up, down, 0))
            else:
                channels.append((rank + 1, rank, kind, down, up, 0))
    # Across the wrap: the last rank's chunk c feeds chunk c + 1 on rank 0, and back.
    for kind in _SENDING:
        lo, hi = kind.code * units, (kind.code + 1) * units
        first, last = sent[kind][0], sent[kind][pp - 1]
        if kind.sends is Flow.DOWNSTREAM:
            channels.append((pp - 1, 0, kind, [c for c in last if c < hi - m],
                             [c - m for c in first if c >= lo + m], m))
        else:
            channels.append((0, pp - 1, kind, [c for c in first if c >= lo + m],
                             [c + m for c in last if c < hi - m], -m))
    for sender, receiver, kind, sent_codes, consumed, shift in channels:
        if sent_codes == consumed:
            continue
        index = next((i for i, (x, y) in enumerate(zip(sent_codes, consumed)) if x != y),
                     min(len(sent_codes), len(consumed)))
        message = sent_codes[index] if index < len(sent_codes) else None
        wanted = consumed[index] if index < len(consumed) else None
        marks = {}
        if message is not None:
            marks[sender] = program[sender].index(message)
        if wanted is not None:
            marks[receiver] = program[receiver].index(wanted + shift)
        _fail(
            schedule,
            marks,
            f"p2p order mismatch on rank {sender} -> rank {receiver} ({kind.sends.payload}s), "
            f"message #{index}: rank {sender} sends the output of {_describe(message, units, m)} "
            f"but rank {receiver} expects that of {_describe(wanted, units, m)}; messages are "
            "matched in posting order, so both ranks must walk this channel in the same unit order",
        )


def _codes_between(program: list[list[int]], lo: int, hi: int) -> list[list[int]]:
    return [[c for c in codes if lo <= c < hi] for codes in program]


def _describe(code: int | None, units: int, m: int) -> str:
    if code is None:
        return "nothing (no such message)"
    kind, unit = divmod(code, units)
    chunk, mb = divmod(unit, m)
    return f"{chunk}{KIND_BY_CODE[kind].value}{mb}"


def _check_progress(schedule: Schedule) -> None:
    stuck = find_deadlock(schedule)
    if stuck:
        _fail(schedule, stuck,
              "deadlock: every unfinished rank waits for an input that is never sent (marked: "
              "where each rank waits)")


def slot_width(units: int) -> int:
    """Slots per rank in the engines' flat tables of produced outputs: one per compute op
    code (compute kinds have the codes below ``FIRST_COPY_CODE * units``)."""
    return FIRST_COPY_CODE * units


def input_slots(codes: np.ndarray, rank: int, pp: int, units: int, m: int, none: int) -> np.ndarray:
    """For each op code of ``rank``, the slot of the op producing its p2p input, vectorized.

    Slots number the compute ops of all ranks: ``rank * slot_width(units) + code``. Ops
    without a p2p input (copies, compute kinds that send nothing, the first forward stage, the
    last backward stage) get ``none``. This is :func:`ir.producer` on op codes: per kind that
    sends, the producer is the same code on the neighbouring rank against the kind's flow, or
    one chunk (m codes) away across the wrap between the last and the first rank.
    """
    width = slot_width(units)
    last = pp - 1
    kinds = codes // units
    dep = np.full(len(codes), none, dtype=np.int64)
    for kind in _SENDING:
        mine = kinds == kind.code
        if not mine.any():
            continue
        lo, hi = kind.code * units, (kind.code + 1) * units
        if kind.sends is Flow.DOWNSTREAM:  # from the previous virtual stage
            if rank > 0:
                dep[mine] = (rank - 1) * width + codes[mine]
            else:
                has = mine & (codes >= lo + m)
                dep[has] = last * width + codes[has] - m
        else:  # from the next virtual stage
            if rank < last:
                dep[mine] = (rank + 1) * width + codes[mine]
            else:
                has = mine & (codes < hi - m)
                dep[has] = codes[has] + m  # rank 0's slots start at 0
    return dep


def find_deadlock(schedule: Schedule) -> dict[int, int]:
    """Dry run with asynchronous sends: each rank runs ops while their inputs exist.
    Returns {rank: step it waits at} for the ranks that never finish ({} = no deadlock).
    Assumes the structure check passed. Applies :func:`ir.producer` to op codes for speed
    (:func:`input_slots`).

    Per step the input's and the output's slot in one flat table of "done" flags are
    precomputed (numpy); copies and ops without a p2p input read an always-set slot.
    A blocked rank is only woken once the slot it waits on is set."""
    pp, m = schedule.pp, schedule.microbatches
    units = schedule.units_per_rank
    program = schedule.program()
    width = slot_width(units)
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
    neighbours = [tuple(sorted({rank - 1, rank + 1, 0, last} - {rank, -1, pp}))
                  for rank in range(pp)]
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
