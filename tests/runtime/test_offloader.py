"""The offload runtime on plain torch (one process): bitwise numerics, freed bytes, pool reuse,
order checking and fault cleanup. The Megatron-driven tests are in tests/integration."""
from __future__ import annotations

import pytest
import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.planning.policy import unit_lifespans, units_to_offload
from megatron_offload.runtime.offloader import ActivationOffloader, ScheduleMismatchError, iteration
from megatron_offload.runtime.store import mark_not_offloadable
from megatron_offload.runtime.transfer import CpuTransferBackend
from megatron_offload.schedule.ir import Op
from megatron_offload.schedule.validate import validate_schedule

HIDDEN = 64
TOKENS = 128  # rows of the activation: each saved tensor is 128 x 64 x 4 B = 32 KiB


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.LayerNorm(HIDDEN),
        torch.nn.Linear(HIDDEN, 4 * HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(4 * HIDDEN, HIDDEN),
    )


def order_1f1b(warmup: int, microbatches: int) -> list[Op]:
    ops = [Op.parse(f"0F{i}") for i in range(warmup)]
    for i in range(microbatches - warmup):
        ops += [Op.parse(f"0F{warmup + i}"), Op.parse(f"0B{i}")]
    ops += [Op.parse(f"0B{i}") for i in range(microbatches - warmup, microbatches)]
    return ops


def run(model, order, offloader=None, offload_units=(), iterations=1, fault_at=None):
    """Drive forward/backward in ``order`` the way a pipeline schedule does; returns grads."""
    grads = []
    for it in range(iterations):
        model.zero_grad(set_to_none=True)
        inputs = {}
        outputs = {}
        torch.manual_seed(100 + it)
        data = {op.microbatch: torch.randn(TOKENS, HIDDEN) for op in order}

        def receive(mb):
            inputs[mb] = data[mb].clone().requires_grad_(True)  # like a p2p-received tensor
            return inputs[mb]

        def forward(mb):
            x = inputs[mb]
            if fault_at == (it, mb):
                raise RuntimeError("injected fault")
            return (model(x).pow(2).mean(),)

        def body():
            for op in order:
                mb = op.microbatch
                if op.kind.value == "F":
                    receive(mb)
                    if offloader is None:
                        outputs[mb] = forward(mb)
                    else:
                        outputs[mb] = offloader.run_forward(
                            (0, mb), [inputs.get(mb)], lambda mb=mb: forward(mb)
                        )
                else:
                    def step(mb=mb):
                        outputs[mb][0].backward()
                        del inputs[mb], outputs[mb]  # Megatron pops both after backward

                    if offloader is None:
                        step()
                    else:
                        key = offloader.unit_for_output(outputs[mb][0])
                        offloader.run_backward(key, step)

        if offloader is None:
            body()
        else:
            with iteration(offloader, order, set(offload_units)):
                body()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def offloader_for(policy="full", measure=True, min_bytes=0):
    return ActivationOffloader(
        OffloadConfig(policy=policy, measure_memory=measure, min_offload_bytes=min_bytes),
        CpuTransferBackend(),
        device_type="cpu",
    )


def test_lifespans_and_policy():
    order = order_1f1b(warmup=3, microbatches=6)
    spans = unit_lifespans(order)
    # F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5
    assert spans == {(0, 0): 3, (0, 1): 4, (0, 2): 5, (0, 3): 5, (0, 4): 4, (0, 5): 3}
    assert units_to_offload(order, OffloadConfig(policy="full")) == {(0, i) for i in range(6)}
    # The last pipeline stage runs each backward right after its forward: nothing to gain.
    assert units_to_offload(order_1f1b(0, 4), OffloadConfig(policy="full")) == set()
    assert units_to_offload(order, OffloadConfig(policy="none")) == set()
    assert units_to_offload(order, OffloadConfig(policy="chunks", offload_chunks=0)) == set()


def test_full_offload_is_bitwise_identical_and_frees_memory():
    order = order_1f1b(warmup=3, microbatches=6)
    reference = run(make_model(), order, iterations=3)
    offloader = offloader_for()
    offload = units_to_offload(order, offloader.config)
    got = run(make_model(), order, offloader, offload, iterations=3)
    for it in range(3):  # every iteration, each against its own reference
        assert all(torch.equal(a, b) for a, b in zip(reference[it], got[it])), it
    for stats in offloader.iteration_stats:  # iteration 0 included: nothing is only shadowed
        assert stats.offloaded_units == 6
        assert stats.offloaded_bytes == stats.reloaded_bytes > 0
    stats = offloader.iteration_stats[-1]

    baseline = offloader_for(policy="none")
    run(make_model(), order, baseline, set())
    peak_none = baseline.iteration_stats[0].peak_resident_bytes
    unit = max(baseline.iteration_stats[0].unit_bytes.values())
    # 4 units in flight without offload; with it: the unit just produced + the one prefetched.
    assert peak_none >= 4 * unit
    # ...plus the 4-byte loss outputs the caller keeps until each backward (never moved).
    assert stats.peak_resident_bytes <= 2 * unit + 4 * 4


def test_schedule_keeps_a_reference_yet_bytes_are_freed():
    """The received input is referenced by the caller (like Megatron's input_tensors list),
    so a copy alone would free nothing: the storage itself must shrink."""
    order = order_1f1b(warmup=2, microbatches=3)  # F0 F1 F2 B0 B1 B2
    offloader = offloader_for()
    model = make_model()
    held = torch.randn(TOKENS, HIDDEN).requires_grad_(True)
    offloader.begin_iteration(order, {(0, 0)})
    out = offloader.run_forward((0, 0), [held], lambda: (model(held).sum(),))
    assert held.untyped_storage().nbytes() == 0  # the schedule's tensor lost its bytes
    outs = [offloader.run_forward((0, 1), [None],
                                  lambda: (model(torch.randn(TOKENS, HIDDEN)).sum(),))]
    assert held.untyped_storage().nbytes() == 0  # still out while F1 runs
    outs.append(offloader.run_forward((0, 2), [None],
                                      lambda: (model(torch.randn(TOKENS, HIDDEN)).sum(),)))
    assert held.untyped_storage().nbytes() == TOKENS * HIDDEN * 4  # prefetched back in place
    for o in [out] + outs:
        offloader.run_backward(offloader.unit_for_output(o[0]), lambda o=o: o[0].backward())
    offloader.end_iteration()
    assert held.grad is not None


def test_a_reload_right_after_its_offload_is_not_issued():
    """Lifespan 1 with prefetch distance 1: the reload would start as soon as the offload
    ends, freeing nothing while any op runs; the runtime list leaves the unit alone."""
    order = order_1f1b(warmup=1, microbatches=2)  # F0 F1 B0 B1: (0, 0) lives across F1
    offloader = offloader_for()
    model = make_model()
    held = torch.randn(TOKENS, HIDDEN).requires_grad_(True)
    offloader.begin_iteration(order, {(0, 0)})
    out = offloader.run_forward((0, 0), [held], lambda: (model(held).sum(),))
    assert held.untyped_storage().nbytes() == TOKENS * HIDDEN * 4
    out1 = offloader.run_forward((0, 1), [None],
                                 lambda: (model(torch.randn(TOKENS, HIDDEN)).sum(),))
    for o in (out, out1):
        offloader.run_backward(offloader.unit_for_output(o[0]), lambda o=o: o[0].backward())
    stats = offloader.end_iteration()
    assert stats.offloaded_bytes == 0 and stats.executed_ops == ["0F0", "0F1", "0B0", "0B1"]


def test_small_parameters_and_marked_tensors_stay():
    offloader = offloader_for(min_bytes=TOKENS * HIDDEN * 4 + 1)
    model = make_model()
    order = order_1f1b(warmup=2, microbatches=3)  # (0, 0) lives across F1 and F2
    offloader.begin_iteration(order, {(0, 0)})
    x = torch.randn(TOKENS, HIDDEN).requires_grad_(True)
    offloader.run_forward((0, 0), [x], lambda: (model(x).sum(),))
    unit = offloader.store.units[(0, 0)]
    sizes = sorted(unit.subunits[None].sizes.values())
    assert sizes and min(sizes) > TOKENS * HIDDEN * 4  # only the 4x-wide MLP tensors moved
    assert not {id(p.untyped_storage()) for p in model.parameters()} & set(unit.movable)
    offloader.abort()

    offloader = offloader_for()
    offloader.begin_iteration(order, {(0, 0)})
    x = torch.randn(TOKENS, HIDDEN).requires_grad_(True)
    keep = mark_not_offloadable(torch.nn.functional.gelu(x))
    offloader.run_forward((0, 0), [None], lambda: ((keep * keep).sum(),))
    assert keep.untyped_storage().nbytes() == TOKENS * HIDDEN * 4
    offloader.abort()


def test_views_of_one_storage_move_once():
    offloader = offloader_for()
    order = order_1f1b(warmup=2, microbatches=3)
    offloader.begin_iteration(order, {(0, 0)})
    x = torch.randn(TOKENS, 3 * HIDDEN, requires_grad=True)

    def step():
        y = x * 2
        q, k, v = y.split(HIDDEN, dim=1)
        return ((q * k * v).sum(),)

    offloader.run_forward((0, 0), [None], step)
    stats = offloader._stats
    # y once (not as q, k and v), plus q * k saved by the second product
    assert stats.offloaded_bytes == TOKENS * 3 * HIDDEN * 4 + TOKENS * HIDDEN * 4
    offloader.abort()


def test_host_pool_stops_growing_after_first_iteration():
    order = order_1f1b(warmup=3, microbatches=8)
    offloader = offloader_for(measure=False)
    run(make_model(), order, offloader, units_to_offload(order, offloader.config), iterations=5)
    sizes = [s.host_pool_bytes for s in offloader.iteration_stats]
    assert sizes[0] > 0 and len(set(sizes)) == 1, sizes
    assert offloader.pool.in_use_bytes == 0


def test_wrong_order_is_an_error_not_a_silent_miss():
    offloader = offloader_for()
    order = order_1f1b(warmup=1, microbatches=2)
    model = make_model()
    offloader.begin_iteration(order, {(0, 0)})
    with pytest.raises(ScheduleMismatchError, match=r"ran 0F1 at step 0.*\[0F0\]"):
        offloader.run_forward((0, 1), [None], lambda: (model(torch.randn(2, HIDDEN)).sum(),))


def test_fault_mid_iteration_leaves_nothing_and_next_iteration_is_exact():
    order = order_1f1b(warmup=3, microbatches=6)
    offloader = offloader_for()
    offload = units_to_offload(order, offloader.config)
    with pytest.raises(RuntimeError, match="injected fault"):
        run(make_model(), order, offloader, offload, fault_at=(0, 4))
    assert offloader.holds_no_tensors()
    assert offloader.pool.in_use_bytes == 0
    reference = run(make_model(), order)
    got = run(make_model(), order, offloader, offload)
    assert all(torch.equal(a, b) for a, b in zip(reference[0], got[0]))


def test_runtime_schedule_is_valid_ir_with_copies_where_the_runtime_makes_them():
    from megatron_offload.planning.policy import runtime_schedule
    from megatron_offload.schedule.layers import runtime_rank_ops
    from megatron_offload.schedule.megatron import megatron_schedule

    order = order_1f1b(warmup=2, microbatches=4)  # F0 F1 F2 B0 F3 B1 B2 B3
    ops = runtime_rank_ops(order, {(0, 0), (0, 1), (0, 2), (0, 3)})
    assert " ".join(map(str, ops)) == (
        "0F0 0O0 0F1 0O1 0R0 0F2 0O2 0B0 0R1 0F3 0O3 0R2 0B1 0R3 0B2 0B3"
    )
    schedule = runtime_schedule(megatron_schedule("interleaved", 4, 2, 8),
                                OffloadConfig(policy="full"))
    validate_schedule(schedule)
    assert schedule.offloaded_units(0) and not schedule.offloaded_units(3) - {
        (0, mb) for mb in range(8)
    }
