"""Layer streaming (``--offload-granularity layer``) in one process, on a toy chunk of layers.

The chunk is a stack of residual MLP blocks hooked with ``integration.layers.hook_layers``,
the same hooks megatron-core's transformer layers get. The runtime follows the layer-level
list of ``schedule.layers.expand_rank`` entry for entry; these tests check the bytes
really leave when a layer ends and come back right before its backward, that results are
bitwise those of a run without the plugin, and that faults and mismatches are loud.
"""
from __future__ import annotations

import pytest
import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.integration.layers import hook_layers
from megatron_offload.planning.policy import runtime_plan, units_to_offload
from megatron_offload.runtime.offloader import (
    ActivationOffloader,
    ScheduleMismatchError,
    iteration,
)
from megatron_offload.runtime.store import UnitState
from megatron_offload.runtime.transfer import CpuTransferBackend
from megatron_offload.schedule.ir import Op
from megatron_offload.schedule.layers import expand_rank

from _async_backend import FakeAsyncBackend

HIDDEN = 32
TOKENS = 64
LAYERS = 3


class Block(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(HIDDEN, 4 * HIDDEN, generator=g) / HIDDEN)
        self.w2 = torch.nn.Parameter(torch.randn(4 * HIDDEN, HIDDEN, generator=g) / HIDDEN)
        self.probe = None  # called at the start of forward (tests look at memory there)

    def forward(self, x):
        if self.probe is not None:
            self.probe(self)
        return x + torch.nn.functional.gelu(x @ self.w1) @ self.w2


class Chunk(torch.nn.Module):
    """Embedding-like prologue, LAYERS blocks, a loss-like epilogue (the unit's rest)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN,
                                                  generator=torch.Generator().manual_seed(7)))
        self.layers = torch.nn.ModuleList(Block(seed) for seed in range(LAYERS))

    def forward(self, x):
        h = torch.tanh(x @ self.pre)
        for layer in self.layers:
            h = layer(h)
        return (h.sin() * h).sum()


def order_of(text: str) -> list[Op]:
    return [Op.parse(t) for t in text.split()]


def offloader_for(backend=None, **config):
    config = dict(policy="full", granularity="layer", min_offload_bytes=0,
                  measure_memory=True) | config
    return ActivationOffloader(OffloadConfig(**config), backend or CpuTransferBackend(),
                               device_type="cpu")


def inputs_for(order):
    return {
        op.microbatch: torch.randn(
            TOKENS, HIDDEN, generator=torch.Generator().manual_seed(100 + op.microbatch)
        )
        for op in order
    }


def reference(chunk, order):
    xs = {mb: x.clone().requires_grad_(True) for mb, x in inputs_for(order).items()}
    outs = {}
    for op in order:
        if op.kind.value == "F":
            outs[op.microbatch] = chunk(xs[op.microbatch])
        else:
            outs.pop(op.microbatch).backward()
    grads = {n: p.grad.clone() for n, p in chunk.named_parameters()}
    chunk.zero_grad(set_to_none=True)
    return grads, {mb: x.grad for mb, x in xs.items()}


def drive(offloader, chunk, order, *, plan=None, fail_at=None):
    """One iteration of ``order`` through the offloader; returns (param grads, input grads)."""
    xs = {mb: x.clone().requires_grad_(True) for mb, x in inputs_for(order).items()}
    offload = units_to_offload(order, offloader.config)
    if plan is None:
        plan = runtime_plan(order, offload, offloader.config, LAYERS,
                            synchronous_copies=not offloader.backend.asynchronous)
    outs = {}
    with iteration(offloader, order, offload, plan=plan):
        for op in order:
            mb = op.microbatch
            if op.kind.value == "F":
                if fail_at == op:
                    chunk.layers[1].probe = lambda layer: (_ for _ in ()).throw(
                        RuntimeError("fault in layer 1"))
                outs[mb] = offloader.run_forward((0, mb), [xs[mb]], lambda mb=mb: (chunk(xs[mb]),))
            else:
                key = offloader.unit_for_output(outs[mb][0])
                offloader.run_backward(key, lambda mb=mb: outs.pop(mb)[0].backward())
    grads = {n: p.grad.clone() for n, p in chunk.named_parameters()}
    chunk.zero_grad(set_to_none=True)
    return grads, {mb: x.grad for mb, x in xs.items()}


@pytest.fixture
def chunk():
    return Chunk()


ORDERS = {
    "lifespans": "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",  # 1F1B, warm-up 3: units outlive others
    "no-lifespan": "0F0 0B0 0F1 0B1 0F2 0B2",  # last stage: every backward follows its forward
}


@pytest.mark.parametrize("name", ORDERS)
def test_streams_layer_by_layer_bitwise_and_as_the_list_says(chunk, name):
    order = order_of(ORDERS[name])
    offloader = offloader_for()
    hook_layers(offloader, chunk.layers)
    expected = reference(chunk, order)
    for _ in range(2):  # the second iteration reuses the host pool
        got = drive(offloader, chunk, order)
        assert all(torch.equal(expected[0][n], got[0][n]) for n in expected[0])
        assert all(torch.equal(expected[1][mb], got[1][mb]) for mb in expected[1])
    stats = offloader.iteration_stats[-1]
    offload = units_to_offload(order, offloader.config)
    planned = expand_rank(order, LAYERS, streamed={op.unit for op in order}, offloaded=offload)
    assert stats.executed_ops == [str(e) for e in planned]  # op for op, copies included
    assert stats.offloaded_bytes == stats.reloaded_bytes > 0
    assert all(away >= 1 for _, _, away, _ in stats.copies)  # nothing came straight back
    assert offloader.holds_no_tensors()
    if name == "no-lifespan":  # the last layer and the rest are needed at once: never copied
        copied = {Op.parse(e).layer for e in stats.executed_ops if Op.parse(e).kind.value == "O"}
        assert copied == set(range(LAYERS - 1))


def test_a_layer_is_out_while_the_next_one_computes_and_back_just_before_its_backward(chunk):
    order = order_of(ORDERS["no-lifespan"])
    offloader = offloader_for()
    hook_layers(offloader, chunk.layers)
    seen = []

    def probe(layer):
        index = list(chunk.layers).index(layer)
        unit = offloader._capturing
        if unit is not None and index > 0:
            previous = unit.subunits[index - 1]
            seen.append((index, previous.state, sum(s.nbytes() for s in previous.movable.values()),
                         sum(previous.sizes.values())))

    for layer in chunk.layers:
        layer.probe = probe
    drive(offloader, chunk, order)
    assert seen and all(state is UnitState.OFFLOADED and now == 0 and had > 0
                        for _, state, now, had in seen)
    ops = offloader.iteration_stats[-1].executed_ops
    for i, text in enumerate(ops):  # distance 0 on the synchronous backend: R right before B
        if "R" in text:
            assert ops[i + 1] == text.replace("R", "B")


@pytest.mark.parametrize("delay_ops", [1, 4])
def test_asynchronous_copies_are_waited_for(chunk, delay_ops):
    order = order_of(ORDERS["lifespans"])
    backend = FakeAsyncBackend(delay_ops)
    offloader = offloader_for(backend)
    hook_layers(offloader, chunk.layers)
    expected = reference(chunk, order)
    got = drive(offloader, chunk, order)
    assert all(torch.equal(expected[0][n], got[0][n]) for n in expected[0])
    assert all(torch.equal(expected[1][mb], got[1][mb]) for mb in expected[1])
    assert offloader.iteration_stats[-1].offloaded_bytes > 0
    assert backend.peak_held_bytes > 0  # copies really were in flight after their sources went
    assert backend.in_flight() == 0 and offloader.holds_no_tensors()


def test_a_fault_inside_a_layer_gives_every_byte_back(chunk):
    order = order_of(ORDERS["lifespans"])
    offloader = offloader_for()
    hook_layers(offloader, chunk.layers)
    with pytest.raises(RuntimeError, match="fault in layer 1"):
        drive(offloader, chunk, order, fail_at=Op.parse("0F2"))
    chunk.layers[1].probe = None
    assert offloader.holds_no_tensors()
    expected = reference(chunk, order)  # and the next iteration is right
    got = drive(offloader, chunk, order)
    assert all(torch.equal(expected[0][n], got[0][n]) for n in expected[0])


def test_a_list_that_does_not_match_the_layers_is_an_error(chunk):
    order = order_of(ORDERS["lifespans"])
    offloader = offloader_for()
    hook_layers(offloader, chunk.layers)
    offload = units_to_offload(order, offloader.config)
    four_layers = runtime_plan(order, offload, offloader.config, LAYERS + 1,
                               synchronous_copies=True)
    with pytest.raises(ScheduleMismatchError,
                       match=r"forward of unit \(0, 0\) ended before 0F0.3 ran"):
        drive(offloader, chunk, order, plan=four_layers)
    assert offloader.holds_no_tensors()


def test_layer_ops_text_round_trips():
    for text in ("0F3", "1F3.2", "0O12.0", "2R0", "0B1.15"):
        assert str(Op.parse(text)) == text
    with pytest.raises(ValueError, match="not a layer op"):
        Op.parse("0X1.2")


def test_true_peak_stays_near_one_layer_per_step(chunk):
    """Measured after every op: above what no activation needs, at most about two layers'
    activations are resident (the one computing and the one just reloaded), not a unit; a
    reloaded layer's bytes go as soon as its backward ran (keeping them until the unit's
    backward ends measured 4.6 layers here)."""
    from megatron_offload.testing.true_peak import TruePeakMeter
    from megatron_offload.testing.vs_megatron import _host_pool_counted

    order = order_of(ORDERS["lifespans"])
    peaks = {}
    for granularity in ("unit", "layer"):
        offloader = offloader_for(granularity=granularity)
        hook_layers(offloader, chunk.layers)
        meter = TruePeakMeter()
        meter.exclude(chunk.parameters())
        restore = _host_pool_counted(meter)  # host buffers are not device bytes
        try:
            with meter:
                meter.start()
                grads = drive(offloader, chunk, order)
                # What no activation needs (gradients, the inputs' grads), held at the end.
                floor = meter.live_bytes()
                meter.stop()
        finally:
            restore()
        del grads
        peaks[granularity] = meter.peak_bytes - floor
        if granularity == "layer":
            layer = max(nbytes for text, nbytes, *_ in offloader.iteration_stats[-1].copies
                        if "." in text)
    assert peaks["layer"] <= 2.5 * layer < peaks["unit"]
