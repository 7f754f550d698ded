"""The p2p plan: one matching order per pair of ranks, read by both from the whole schedule."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_offload.schedule.gis import gis_schedule
from megatron_offload.schedule.ir import B, F, Schedule, ScheduleError
from megatron_offload.schedule.megatron import megatron_schedule
from megatron_offload.schedule.p2p import build_plan, check_plan
from megatron_offload.schedule.validate import validate_schedule

SHAPES = [(p, v, m, g) for p in (2, 3, 4, 8) for v in (1, 2, 4) for m in (1, p, 2 * p + 1)
          for g in sorted({1, (p + 1) // 2, min(p, m), m}) if g <= m]


def _mirror(plan):
    """Both ranks of each pair see the same messages in the same order, one as sends, the
    other as receives; every consumed input is posted exactly once."""
    for rank_plan in plan.ranks:
        for peer, posts in rank_plan.queues.items():
            theirs = plan.ranks[peer].queues[rank_plan.rank]
            assert [(p.message, p.send) for p in posts] == [(q.message, not q.send) for q in theirs]
        received = sorted(msg for _, msg in rank_plan.receives.values())
        posted = sorted(p.message for posts in rank_plan.queues.values() for p in posts
                        if not p.send)
        assert received == posted


@pytest.mark.parametrize("p, v, m, g", SHAPES)
def test_every_gis_shape_has_a_consistent_plan(p, v, m, g):
    schedule = gis_schedule(p, v, m, g)
    for forward_only in (False, True):
        _mirror(build_plan(schedule, forward_only=forward_only))


def test_megatron_pp2_vpp2_orders_both_channels_on_one_pair():
    """PP=2 + VPP: activations and gradients of both directions share one pair of ranks (the
    batched-p2p trap). The plan lists them in one order that both ranks follow."""
    plan = build_plan(megatron_schedule("interleaved", 2, 2, 4))
    order = plan.pair_order[(0, 1)]
    kinds = {(sender, message[0]) for sender, _, message in order}
    assert kinds == {(0, "F"), (1, "F"), (0, "B"), (1, "B")}
    _mirror(plan)


def test_a_queue_that_cannot_be_followed_is_rejected():
    plan = build_plan(megatron_schedule("interleaved", 2, 2, 4))
    rank0 = plan.ranks[0]
    posts = list(rank0.queues[1])
    # move the first receive of rank 0 behind a send it has to post later
    first_recv = next(i for i, post in enumerate(posts) if not post.send)
    later_send = next(i for i, post in enumerate(posts)
                      if post.send and post.step >= posts[first_recv].step)
    posts.insert(later_send, posts.pop(first_recv))
    broken = dataclasses.replace(plan, ranks=(dataclasses.replace(rank0, queues={1: tuple(posts)}),
                                              plan.ranks[1]))
    with pytest.raises(ScheduleError, match="cannot be followed"):
        check_plan(broken)


def test_a_schedule_that_would_deadlock_is_rejected_before_running():
    # rank 0 wants the gradient of microbatch 0 before it sent microbatch 1's activation, and
    # rank 1 runs microbatch 1 first: nobody can move.
    schedule = Schedule(((F(0, 0), B(0, 0), F(0, 1), B(0, 1)),
                         (F(0, 1), B(0, 1), F(0, 0), B(0, 0))), 1, 2)
    with pytest.raises(ScheduleError, match="deadlock|order mismatch"):
        validate_schedule(schedule)
    with pytest.raises(ScheduleError, match="deadlock"):
        build_plan(Schedule(((F(0, 0), B(0, 0), F(0, 1), B(0, 1)),
                             (F(0, 1), F(0, 0), B(0, 0), B(0, 1))), 1, 2))
