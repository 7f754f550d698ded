"""The executor runs each compute kind through its handler; a kind without one is refused,
by name, before the rank runs anything (never run as if it were another kind)."""
from types import SimpleNamespace

import pytest
import torch

from megatron_offload.runtime.executor import run_rank
from megatron_offload.schedule.ir import B, F, O, Schedule
from megatron_offload.schedule.p2p import P2PPlan, RankPlan


class _Group:
    def size(self):
        return 1

    def rank(self):
        return 0


def test_a_kind_without_a_handler_is_refused_by_name():
    schedule = Schedule([[F(0, 0), B(0, 0)]], 1, 1)
    # A row whose compute ops hold a kind the executor has no handler for.
    rank_plan = RankPlan(rank=0, ops=(F(0, 0), O(0, 0), B(0, 0)), queues={}, receives={}, sends={})
    plan = P2PPlan(pp=1, vpp=1, microbatches=1, ranks=(rank_plan,), pair_order={})
    calls = []

    def never(*args, **kwargs):
        calls.append(args)
        raise AssertionError("no step may run")

    config = SimpleNamespace(param_sync_func=lambda params: calls.append("param sync"),
                             no_sync_func=None, grad_sync_func=None)
    with pytest.raises(NotImplementedError, match=r"no handler for op kind\(s\) OFFLOAD \('O'\)"):
        run_rank(schedule=schedule, plan=plan, rank=0, forward_step_func=never, data_iterator=None,
                 model=[torch.nn.Linear(2, 2)], num_microbatches=1, config=config,
                 pp_group=_Group(),
                 tensor_shape=(1, 2), forward_step=never, backward_step=never, call_by_name=never)
    assert calls == []
