"""Regression tests for the runtime's defects on real Megatron-LM job settings (found and
fixed in November 2026), one section per defect, each on the smallest setting that shows it,
in one process.

The Megatron-driven versions (DDP with overlap_grad_reduce, real layers, several ranks) are in
tests/integration/test_realistic_matrix.py.
"""
from __future__ import annotations

import functools
import types

import pytest
import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.planning.policy import units_to_offload
from megatron_offload.releases import call_by_name
from megatron_offload.runtime.offloader import ActivationOffloader, iteration
from megatron_offload.runtime.transfer import CpuTransferBackend
from megatron_offload.schedule.ir import Op
from megatron_offload.schedule.layers import runtime_rank_ops

from _async_backend import FakeAsyncBackend

HIDDEN = 64
TOKENS = 128


def offloader_for(backend=None, policy="full", measure=True):
    return ActivationOffloader(
        OffloadConfig(policy=policy, measure_memory=measure, min_offload_bytes=0),
        backend or CpuTransferBackend(),
        device_type="cpu",
    )


def order_of(text: str) -> list[Op]:
    return [Op.parse(t) for t in text.split()]


ALL_FORWARD_FIRST = order_of("0F0 0F1 0F2 0B0 0B1 0B2")


def drive(offloader, order, forward, *, inputs=None, offload=None):
    """Run ``order`` once: ``forward(mb, x)`` returns a scalar; returns the inputs' grads."""
    inputs = (
        inputs
        if inputs is not None
        else {
            op.microbatch: torch.randn(
                TOKENS, HIDDEN, generator=torch.Generator().manual_seed(op.microbatch)
            ).requires_grad_(True)
            for op in order
        }
    )
    outputs = {}
    offload = units_to_offload(order, offloader.config) if offload is None else offload

    def body():
        for op in order:
            mb = op.microbatch
            if op.kind.value == "F":
                outputs[mb] = offloader.run_forward(
                    (0, mb), [inputs[mb]], lambda mb=mb: (forward(mb, inputs[mb]),)
                )
            else:
                key = offloader.unit_for_output(outputs[mb][0])
                offloader.run_backward(key, lambda mb=mb: outputs.pop(mb)[0].backward())

    with iteration(offloader, order, offload):
        body()
    return {mb: x.grad for mb, x in inputs.items()}


def batch_and_copy(microbatches: int):
    """Inputs the caller keeps (as for a retry), and a copy of their bytes to check against."""
    batch = {mb: torch.randn(TOKENS, HIDDEN).requires_grad_(True) for mb in range(microbatches)}
    return batch, {mb: t.detach().clone() for mb, t in batch.items()}


def reference(order, forward):
    grads = {}
    for op in order:
        if op.kind.value == "F":
            mb = op.microbatch
            x = torch.randn(
                TOKENS, HIDDEN, generator=torch.Generator().manual_seed(mb)
            ).requires_grad_(True)
            forward(mb, x).backward()
            grads[mb] = x.grad
    return grads


# ---------------------------------------- saved Parameters reach custom Functions as themselves
@pytest.fixture
def fused_wgrad_kernel(monkeypatch):
    """Megatron's linear Function with a CPU stand-in for the fused wgrad kernel."""
    from megatron.core.tensor_parallel import layers

    def accumulate(total_input, grad_output, main_grad):  # the kernel's arithmetic
        main_grad.add_(grad_output.t().matmul(total_input).to(main_grad.dtype))

    monkeypatch.setattr(
        layers, "fused_weight_gradient_mlp_cuda",
        types.SimpleNamespace(wgrad_gemm_accum_fp32=accumulate, wgrad_gemm_accum_fp16=accumulate),
        raising=False,
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    return layers.LinearWithGradAccumulationAndAsyncCommunication


def _fused_param():
    weight = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN,
                                            generator=torch.Generator().manual_seed(7)))
    weight.main_grad = torch.zeros(HIDDEN, HIDDEN)
    weight.grad_added_to_main_grad = False  # what Megatron DDP sets on every parameter
    return weight


def test_fused_wgrad_accumulation_sees_the_parameter_itself(fused_wgrad_kernel):
    linear = fused_wgrad_kernel

    def forward(weight):
        return lambda mb, x: call_by_name(
            linear, input=x, weight=weight, bias=None, gradient_accumulation_fusion=True,
            allreduce_dgrad=False, sequence_parallel=False, grad_output_buffer=None,
            wgrad_deferral_limit=0, tp_group=None, gtp_remat_size=1,
        ).pow(2).sum()

    plain = _fused_param()
    reference(ALL_FORWARD_FIRST, forward(plain))
    assert plain.grad_added_to_main_grad and plain.grad is not None

    weight = _fused_param()
    offloader = offloader_for()
    drive(offloader, ALL_FORWARD_FIRST, forward(weight))
    assert offloader.iteration_stats[-1].offloaded_units == 3  # every unit really moved
    # The flag reached the real Parameter, so Megatron returned its dummy wgrad and DDP's
    # overlap_grad_reduce hook finds param.grad set (before the fix: None, then an assert).
    assert weight.grad_added_to_main_grad
    assert weight.grad is not None
    assert torch.equal(weight.main_grad, plain.main_grad)
    # The patch of ctx.saved_tensors lives only while an iteration runs.
    from torch.autograd.function import BackwardCFunction

    assert "saved_tensors" not in BackwardCFunction.__dict__


# ---------------------------------------------------- a storage its owner released is not moved
def test_checkpoint_without_output_releases_a_saved_storage(fused_wgrad_kernel):
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    from megatron_offload.integration.cpu.core import cpu_shims

    norm = torch.nn.LayerNorm(HIDDEN)
    proj = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(mb, x):
        # Megatron's selective "layernorm" recompute: the norm output is saved by the next
        # layer, then its storage is shrunk to 0 bytes until recompute regrows it.
        checkpoint = CheckpointWithoutOutput(fp8=None)  # as TransformerLayer passes config.fp8
        normed = checkpoint.checkpoint(norm, x)
        out = proj(normed)
        checkpoint.discard_output_and_register_recompute(out)
        return out.pow(2).sum()

    with cpu_shims():
        expected = reference(ALL_FORWARD_FIRST, forward)
        offloader = offloader_for()
        got = drive(offloader, ALL_FORWARD_FIRST, forward)
    assert all(torch.equal(expected[mb], got[mb]) for mb in expected)
    stats = offloader.iteration_stats[-1]
    assert stats.kept_released_storages == 3  # the released norm output of each unit
    assert stats.offloaded_bytes == stats.reloaded_bytes > 0


# ------------------------------------------------ caches shared across units stay on the device
def test_a_cache_created_by_the_first_unit_is_not_freed():
    weight = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN))
    cache = {}

    def forward(mb, x):
        # like autocast's weight-cast cache: made by the first microbatch, reused by all
        w = cache.setdefault("w", weight.clone())
        return (x @ w).tanh().sum()

    expected = reference(ALL_FORWARD_FIRST, forward)
    cache.clear()
    offloader = offloader_for()
    got = drive(offloader, ALL_FORWARD_FIRST, forward)
    assert all(torch.equal(expected[mb], got[mb]) for mb in expected)
    assert cache["w"].untyped_storage().nbytes() == HIDDEN * HIDDEN * 4
    assert offloader.iteration_stats[-1].kept_shared_storages >= 2


def test_real_autocast_cache_across_microbatches():
    linear = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(mb, x):
        return linear(x).float().pow(2).sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(ALL_FORWARD_FIRST, forward)
    offloader = offloader_for()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # one region around all microbatches
        got = drive(offloader, ALL_FORWARD_FIRST, forward)
    assert all(torch.equal(expected[mb], got[mb]) for mb in expected)
    assert offloader.iteration_stats[-1].offloaded_bytes > 0


def test_no_grad_cache_first_created_in_a_later_iteration():
    table_calls = []

    @functools.lru_cache
    def rotary_table(length: int) -> torch.Tensor:  # like RotaryEmbedding.forward's cache
        table_calls.append(length)
        return torch.linspace(0.5, 1.5, length * HIDDEN).reshape(length, HIDDEN)

    def forward_for(length):
        def forward(mb, x):
            return (x[:length] * rotary_table(length)).pow(2).sum()
        return forward

    offloader = offloader_for()
    for it, length in enumerate([TOKENS, TOKENS // 2, TOKENS // 4, TOKENS // 2]):
        expected = reference(ALL_FORWARD_FIRST, forward_for(length))
        got = drive(offloader, ALL_FORWARD_FIRST, forward_for(length))
        assert all(torch.equal(expected[mb], got[mb]) for mb in expected), it
        stats = offloader.iteration_stats[-1]
        assert stats.offloaded_bytes == stats.reloaded_bytes > 0
    assert table_calls == [TOKENS, TOKENS // 2, TOKENS // 4]
    assert rotary_table(TOKENS // 4).untyped_storage().nbytes() == TOKENS // 4 * HIDDEN * 4


# ---------------------------------------------- an in-place write to a saved tensor is an error
@pytest.mark.parametrize("policy", ["full", "none"])
def test_in_place_write_after_save_is_an_error(policy):
    weight = torch.randn(HIDDEN, HIDDEN)

    def forward(mb, x):
        h = torch.tanh(x @ weight)
        out = (3 * h).sum()
        h.add_(1)  # plain autograd refuses this at backward
        return out

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        reference(ALL_FORWARD_FIRST, forward)
    offloader = offloader_for(policy=policy)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        drive(offloader, ALL_FORWARD_FIRST, forward)
    assert offloader.holds_no_tensors()


# ---------------------------------------------------- a fault gives every tensor its bytes back
@pytest.mark.parametrize("delay_ops", [None, 0, 3])
def test_a_fault_gives_the_callers_tensors_their_bytes_back(delay_ops):
    backend = CpuTransferBackend() if delay_ops is None else FakeAsyncBackend(delay_ops)
    offloader = offloader_for(backend)
    order = order_of("0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3")
    batch, kept = batch_and_copy(4)

    def forward(mb, x):
        if mb == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return (x * 2).tanh().sum()

    with pytest.raises(RuntimeError, match="simulated"):
        drive(offloader, order, forward, inputs=batch)
    for mb, t in batch.items():  # the batch kept for a retry is intact
        assert t.untyped_storage().nbytes() == TOKENS * HIDDEN * 4
        assert torch.equal(t.detach(), kept[mb])
    assert offloader.holds_no_tensors()
    # ...and the retry with the same tensors is exact.
    for t in batch.values():
        t.grad = None
    got = drive(offloader, order, lambda mb, x: (x * 2).tanh().sum(), inputs=batch)
    for mb in range(4):
        x = kept[mb].clone().requires_grad_(True)
        (x * 2).tanh().sum().backward()
        assert torch.equal(got[mb], x.grad)


# ------------------------------------------------ an interrupted abort still resets the runtime
class _InterruptedOnce(FakeAsyncBackend):
    def __init__(self):
        super().__init__(delay_ops=5)
        self.interrupt = False

    def wait_host(self, transfer):
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt("second Ctrl-C while abort() waits for a copy")
        super().wait_host(transfer)


def test_an_interrupted_abort_still_resets_the_runtime():
    backend = _InterruptedOnce()
    offloader = offloader_for(backend)
    order = order_of("0F0 0F1 0F2 0B0 0B1 0B2")

    def failing(mb, x):
        if mb == 2:
            backend.interrupt = True
            raise RuntimeError("first fault")
        return x.tanh().sum()

    with pytest.raises(KeyboardInterrupt):
        drive(offloader, order, failing)
    assert not offloader._in_iteration and offloader.holds_no_tensors()
    grads = drive(offloader, order, lambda mb, x: x.tanh().sum())  # no "called twice"
    assert set(grads) == {0, 1, 2}


# ---------------------------------------------------- memory is freed when its copy is enqueued
@pytest.mark.parametrize("delay_ops", [1, 3, 8])
@pytest.mark.parametrize(
    "order_text",
    [
        "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0B3 0B4 0B5",  # 1F1B, warm-up 3
        # lifespans of 2 ops: reload due while copying out
        "0F0 0F1 0F2 0B0 0F3 0B1 0F4 0B2 0B3 0B4",
    ],
)
def test_units_are_freed_when_their_copy_is_enqueued(delay_ops, order_text):
    order = order_of(order_text)
    weight = torch.randn(HIDDEN, 4 * HIDDEN)

    def forward(mb, x):
        return torch.nn.functional.gelu(x @ weight).pow(2).sum()

    backend = FakeAsyncBackend(delay_ops)
    offloader = offloader_for(backend)
    freed_right_after_forward = []
    original = offloader._send

    def check(unit, sub):
        original(unit, sub)
        freed_right_after_forward.append(all(s.nbytes() == 0 for s in sub.movable.values()))

    offloader._send = check
    for _ in range(2):
        freed_right_after_forward.clear()
        expected = reference(order, forward)
        got = drive(offloader, order, forward)
        assert all(torch.equal(expected[mb], got[mb]) for mb in expected)
        stats = offloader.iteration_stats[-1]
        offloaded = sum(op.kind.value == "O" for op in runtime_rank_ops(
            order, units_to_offload(order, offloader.config),
            offloader.config.unit_prefetch_distance))
        assert stats.offloaded_units == offloaded == len(freed_right_after_forward) > 0
        assert stats.offloaded_bytes == stats.reloaded_bytes > 0
        assert all(freed_right_after_forward)
    assert backend.peak_held_bytes > 0  # copies really were in flight after the free
    if delay_ops > 1:
        assert backend.stalls > 0  # some reload was due before its copies completed
    assert backend.held_bytes == 0 and backend.in_flight() == 0


def test_abort_with_copies_in_flight_restores_and_drains():
    backend = FakeAsyncBackend(delay_ops=10)
    offloader = offloader_for(backend)
    order = order_of("0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3")
    batch, kept = batch_and_copy(4)

    def forward(mb, x):
        if mb == 3:
            assert backend.in_flight() > 0
            raise RuntimeError("fault with copies in flight")
        return x.sin().sum()

    with pytest.raises(RuntimeError, match="in flight"):
        drive(offloader, order, forward, inputs=batch)
    assert backend.in_flight() == 0 and backend.held_bytes == 0
    assert all(torch.equal(batch[mb].detach(), kept[mb]) for mb in batch)
    assert offloader.holds_no_tensors()


# -------------------------------------------------------- parameters and their views never move
def test_parameters_and_their_views_never_move():
    model = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 4 * HIDDEN), torch.nn.GELU(),
                                torch.nn.Linear(4 * HIDDEN, HIDDEN))
    offloader = offloader_for()
    order = order_of("0F0 0F1 0F2 0B0 0B1 0B2")  # (0, 0) lives across two forwards
    offloader.begin_iteration(order, {(0, 0)})
    x = torch.randn(TOKENS, HIDDEN).requires_grad_(True)
    offloader.run_forward((0, 0), [x], lambda: (model(x).sum(),))
    unit = offloader.store.units[(0, 0)]
    assert unit.movable  # something moved...
    param_storages = {id(p.untyped_storage()) for p in model.parameters()}
    assert not param_storages & set(unit.movable)  # ...but no parameter storage
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())
    offloader.abort()


# ------------------------------------------------------------------ config checks name the flag
@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"prefetch_distance": 1.5}, "--offload-prefetch"),
        ({"prefetch_distance": "2"}, "--offload-prefetch"),
        ({"prefetch_distance": True}, "--offload-prefetch"),
        ({"policy": "chunks", "offload_chunks": True}, "--offload-chunks"),
        ({"policy": "chunks", "offload_chunks": 1.0}, "--offload-chunks"),
        ({"measure_memory": "no"}, "--offload-report"),
        ({"min_offload_bytes": 1.5}, "--offload-min-bytes"),
        ({"min_offload_bytes": False}, "--offload-min-bytes"),
        ({"host_budget_gib": "8"}, "--offload-host-budget-gib"),
        ({"host_budget_gib": 0}, "--offload-host-budget-gib"),
    ],
)
def test_config_checks_types_and_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        OffloadConfig(**kwargs)


# -------------------------------------------- the host pool stays bounded and within its budget
class _RecordingPinner:
    """Stands in for cudaHostRegister: what is pinned, by address."""

    def __init__(self):
        self.pinned = {}

    def pin(self, buffer):
        self.pinned[buffer.data_ptr()] = buffer.numel()

    def unpin(self, buffer):
        del self.pinned[buffer.data_ptr()]


def test_host_pool_is_bounded_when_sequence_length_changes():
    """100 iterations over 8 sequence lengths through the offloader: the pool stops growing
    after the first iteration of each length, stays under 1.5x the largest iteration's need,
    and the bytes it reports pinned are the bytes pinned."""
    from megatron_offload.runtime.host_pool import HostBufferPool

    pinner = _RecordingPinner()
    offloader = offloader_for(measure=False)
    offloader.pool = HostBufferPool(pinner=pinner)
    order = order_of("0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0B3 0B4 0B5")
    weight = torch.randn(HIDDEN, HIDDEN)
    lengths = [512 + 32 * i for i in range(8)]
    schedule = [lengths[i]
                for i in torch.randint(0, 8, (100,), generator=torch.Generator().manual_seed(3))]
    schedule[:8] = lengths[::-1]  # every length early, longest first...
    schedule[50] = 1024  # ...and one longer length later on
    seen, capacity_by_iteration, grew_on = set(), [], []
    for it, length in enumerate(schedule):
        inputs = {mb: torch.randn(length, HIDDEN).requires_grad_(True) for mb in range(6)}
        before = offloader.pool.allocations
        drive(offloader, order, lambda mb, x: torch.nn.functional.gelu(x @ weight).sum(),
              inputs=inputs)
        stats = offloader.iteration_stats[-1]
        if offloader.pool.allocations != before:
            grew_on.append((it, length))
            assert length not in seen, f"iteration {it}: new buffers for a length seen before"
        seen.add(length)
        capacity_by_iteration.append(stats.host_pool_bytes)
        assert stats.host_pinned_bytes == stats.host_pool_bytes == sum(pinner.pinned.values())
        assert stats.offloaded_bytes == stats.reloaded_bytes
    largest_need = max(s.host_peak_bytes for s in offloader.iteration_stats)
    assert max(capacity_by_iteration) <= 1.5 * largest_need
    assert grew_on[0] == (0, 736) and (50, 1024) in grew_on
    offloader.close()
    assert not pinner.pinned and offloader.pool.capacity_bytes == 0  # returned at uninstall


def test_host_budget_refuses_the_allocation_that_crosses_it():
    from megatron_offload.runtime.host_pool import HostBudgetExceeded

    config = OffloadConfig(policy="full", min_offload_bytes=0, host_budget_gib=150 * 1024 / 2**30)
    offloader = ActivationOffloader(config, CpuTransferBackend(), device_type="cpu")
    batch, kept = batch_and_copy(3)
    with pytest.raises(HostBudgetExceeded, match="--offload-host-budget-gib"):
        drive(offloader, ALL_FORWARD_FIRST, lambda mb, x: (x * 2).tanh().sum(), inputs=batch)
    assert all(torch.equal(batch[mb].detach(), kept[mb]) for mb in batch)
    assert offloader.holds_no_tensors()
