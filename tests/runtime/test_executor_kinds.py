"""The executor runs each compute kind through its handler (F: megatron-core's forward_step, B:
its backward_step, for the op's chunk and microbatch, in the row's order); a kind without one
is refused, by name, before the rank runs anything (never run as if it were another kind)."""
from types import SimpleNamespace

import pytest
import torch

from megatron_offload.runtime.executor import run_rank
from megatron_offload.schedule.ir import B, F, O, Schedule
from megatron_offload.schedule.p2p import P2PPlan, RankPlan, build_plan
from megatron_offload.schedule.validate import validate_schedule


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


def test_each_op_reaches_the_step_of_its_kind_for_its_unit_in_row_order():
    # One rank (pp=1: no p2p), two chunks, three microbatches, forwards and backwards
    # interleaved so that a step run for the wrong kind or unit shows in the call list.
    row = [F(0, 0), F(1, 0), F(0, 1), B(1, 0), F(1, 1), B(0, 0), F(0, 2), B(1, 1), F(1, 2),
           B(0, 1), B(1, 2), B(0, 2)]
    schedule = validate_schedule(Schedule([row], 2, 3))
    chunks = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    data = [object(), object()]
    calls, made = [], []  # made: (a forward's output, its (chunk, microbatch))

    def forward_step(*, model, data_iterator, current_microbatch, vp_stage, input_tensor,
                     **_):
        chunk = next(c for c, module in enumerate(chunks) if module is model)
        assert data_iterator is data[chunk] and vp_stage == chunk and input_tensor is None
        calls.append(("F", chunk, current_microbatch))
        output = torch.zeros(1, 2)
        made.append((output, (chunk, current_microbatch)))
        return output, 1

    def backward_step(*, input_tensor, output_tensor, output_tensor_grad, **_):
        assert input_tensor is None and output_tensor_grad is None
        calls.append(("B", *next(unit for output, unit in made if output is output_tensor)))
        return None

    config = SimpleNamespace(param_sync_func=None, no_sync_func=None, grad_sync_func=None)
    failure = None
    try:
        run_rank(schedule=schedule, plan=build_plan(schedule), rank=0, forward_step_func=None,
                 data_iterator=data, model=chunks, num_microbatches=3, config=config,
                 pp_group=_Group(), tensor_shape=(1, 2), forward_step=forward_step,
                 backward_step=backward_step, call_by_name=lambda step, **kwargs: step(**kwargs))
    except Exception as error:  # a misrouted op fails later, on state its kind did not leave
        failure = error
    expected = [(op.kind.value, op.chunk, op.microbatch) for op in row]
    assert calls == expected, f"steps called {calls}, run_rank raised {failure!r}"
    assert failure is None
