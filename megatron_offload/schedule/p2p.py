"""Point-to-point communication of a schedule, derived from all ranks' op lists (no torch).

The executor (``runtime/executor.py``) sends each compute op's output to the rank that
consumes it and receives each op's input from the rank that produces it, one non-blocking
send / receive per message. Messages between two ranks are matched in posting order (NCCL
per pair of ranks, gloo per direction and tag), so both ranks must post the messages they
exchange in the same order. That order is fixed here, once, from the whole schedule, and both
ranks read it from the same data: matching is correct by construction, whatever the schedule
(Megatron's PP=2 + VPP batched-p2p trap, where two sends to one peer were matched the wrong
way round, cannot happen).

The order on a pair of ranks {a, b} (both directions together) is the order in which the
messages are produced in a dry run of the schedule with positive op times (each kind's
``nominal_time``: forward 1, backward 2; no latency); ties by sender rank, then sender step.
Why every rank can follow it without waiting for anything it has not produced: if rank a's
send S comes before a message X that a receives, then S was produced no later than X, and
X's consumer on a starts after X exists, hence after S's producer ended: a reaches the
consumer of X only after it produced S.
So a rank posts, on each pair, its sends as soon as their op ends (after any receives that
precede them in the pair order) and its receives when it comes within ``lookahead`` compute
ops of their consumer (or earlier, when a later message on the pair needs them posted).
:func:`check_plan` verifies that property for every rank and message.

Who sends what to whom is the op-kind table's ``sends`` column (:mod:`.kinds`) applied by
:func:`ir.producer` / :func:`ir.consumer`: a kind's output goes to the op of the same kind on
the neighbouring virtual stage along its flow; copies send nothing. Message identity at the
receiver: (kind letter, consumer chunk, microbatch), F for activations and B for gradients;
every unit of a rank receives at most one of each.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import Schedule, ScheduleError, consumer, format_grid, producer
from .kinds import COMPUTE_KINDS, FORWARD_PASS_KINDS

Message = tuple[str, int, int]
"""(letter of the kind that sends it: 'F' activations / 'B' gradients, chunk at the receiver,
microbatch)."""


@dataclass(frozen=True, slots=True)
class Post:
    """One message as one rank posts it: a send (after step ``step`` produced it) or a receive
    (consumed by step ``step``), to or from ``peer``."""

    send: bool
    peer: int
    message: Message
    step: int


@dataclass(frozen=True, slots=True)
class RankPlan:
    """What one rank posts. Steps index the rank's compute ops (no copies), in order."""

    rank: int
    ops: tuple
    """The rank's compute ops (today F and B), in order."""
    queues: dict
    """peer -> tuple[Post, ...]: this rank's posts on that pair, in the pair's order."""
    receives: dict
    """compute step -> (peer, message) the step consumes, or absent."""
    sends: dict
    """compute step -> (peer, message) the step's output goes to, or absent."""


@dataclass(frozen=True, slots=True)
class P2PPlan:
    pp: int
    vpp: int
    microbatches: int
    ranks: tuple
    """One :class:`RankPlan` per rank."""
    pair_order: dict
    """(low rank, high rank) -> tuple of (sender, receiver, message) in matching order."""


def compute_rows(schedule: Schedule, *, forward_only: bool = False) -> list[list]:
    """Each rank's compute ops (with ``forward_only`` those of the forward pass: the kinds
    sending downstream, today F), in order."""
    kinds = FORWARD_PASS_KINDS if forward_only else COMPUTE_KINDS
    return [[op for op in ops if op.kind in kinds] for ops in schedule.ranks]


def _dry_run(rows: list[list], pp: int, vpp: int) -> list[list[float]]:
    """End time of every compute op (its kind's ``nominal_time``, no latency); ScheduleError
    with the grid if some rank can never proceed."""
    ends: list[list[float]] = [[] for _ in range(pp)]
    done: dict[tuple[int, str, int, int], float] = {}
    position = [0] * pp
    clock = [0.0] * pp
    progress = True
    while progress:
        progress = False
        for rank in range(pp):
            row = rows[rank]
            while position[rank] < len(row):
                op = row[position[rank]]
                source = producer(rank, op.kind, op.chunk, pp, vpp) if pp > 1 else None
                ready = clock[rank]
                if source is not None:
                    arrived = done.get((source[0], op.kind.value, source[1], op.microbatch))
                    if arrived is None:
                        break
                    ready = max(ready, arrived)
                clock[rank] = ready + op.kind.nominal_time
                done[(rank, op.kind.value, op.chunk, op.microbatch)] = clock[rank]
                ends[rank].append(clock[rank])
                position[rank] += 1
                progress = True
    stuck = {r: position[r] for r in range(pp) if position[r] < len(rows[r])}
    if stuck:
        shown = Schedule(tuple(tuple(row) for row in rows), vpp,
                         max(1, max((op.microbatch for row in rows for op in row), default=0) + 1))
        raise ScheduleError(
            "deadlock: every unfinished rank waits for an input that is never sent (marked: "
            f"where each rank waits)\n{format_grid(shown, stuck)}"
        )
    return ends


def build_plan(schedule: Schedule, *, forward_only: bool = False) -> P2PPlan:
    """The p2p plan of ``schedule`` (copies ignored; ``forward_only``: the forward pass only)."""
    pp, vpp = schedule.pp, schedule.vpp
    rows = compute_rows(schedule, forward_only=forward_only)
    ends = _dry_run(rows, pp, vpp)
    produced: dict[tuple[int, str, int, int], tuple[int, int]] = {}
    sends: list[dict] = [{} for _ in range(pp)]
    receives: list[dict] = [{} for _ in range(pp)]
    # (time, sender, sender step, receiver, message) per unordered pair
    pairs: dict[tuple[int, int], list] = {}
    for rank, row in enumerate(rows):
        for step, op in enumerate(row):
            produced[(rank, op.kind.value, op.chunk, op.microbatch)] = (rank, step)
    for rank, row in enumerate(rows):
        for step, op in enumerate(row):
            if pp == 1:
                continue
            target = consumer(rank, op.kind, op.chunk, pp, vpp)
            if target is not None:
                message = (op.kind.value, target[1], op.microbatch)
                sends[rank][step] = (target[0], message)
                key = (min(rank, target[0]), max(rank, target[0]))
                pairs.setdefault(key, []).append((ends[rank][step], rank, step, target[0], message))
            source = producer(rank, op.kind, op.chunk, pp, vpp)
            if source is not None:
                if (source[0], op.kind.value, source[1], op.microbatch) not in produced:
                    raise ScheduleError(
                        f"rank {rank} step {step}: {op} needs an input nobody produces")
                receives[rank][step] = (source[0], (op.kind.value, op.chunk, op.microbatch))
    step_of = [{value: step for step, value in receives[rank].items()} for rank in range(pp)]
    pair_order = {}
    queues: list[dict] = [{} for _ in range(pp)]
    for key, items in pairs.items():
        items.sort(key=lambda item: item[:3])
        pair_order[key] = tuple((sender, receiver, message)
                                for _, sender, _, receiver, message in items)
        for rank in key:
            posts = []
            for _, sender, sender_step, receiver, message in items:
                if sender == rank:
                    posts.append(Post(True, receiver, message, sender_step))
                if receiver == rank:
                    posts.append(Post(False, sender, message, step_of[rank][(sender, message)]))
            queues[rank][key[1] if rank == key[0] else key[0]] = tuple(posts)
    plan = P2PPlan(
        pp=pp, vpp=vpp, microbatches=schedule.microbatches,
        ranks=tuple(RankPlan(r, tuple(rows[r]), queues[r], receives[r], sends[r])
                    for r in range(pp)),
        pair_order=pair_order,
    )
    check_plan(plan)
    return plan


def check_plan(plan: P2PPlan) -> None:
    """Every rank can post its pair queues in order without waiting for a send it has not
    produced yet: a send that precedes, on its pair, a receive the rank needs at step j was
    produced before step j. Raises ScheduleError naming the rank, the pair and the messages."""
    for rank_plan in plan.ranks:
        for peer, posts in rank_plan.queues.items():
            last_send_step = -1
            for post in posts:
                if post.send:
                    last_send_step = max(last_send_step, post.step)
                elif post.step <= last_send_step:
                    raise ScheduleError(
                        f"p2p plan: rank {rank_plan.rank} must post a send to rank {peer} produced "
                        f"at compute step {last_send_step} before receiving {post.message} needed "
                        f"at step {post.step}; the pair order cannot be followed"
                    )
