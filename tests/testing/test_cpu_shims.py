"""The CPU shims patch what they say and restore every original exactly."""
import pytest
import torch

from megatron_offload.integration.cpu import core as cpu_shims
from megatron_offload.releases import release

FACTS = release()  # the installed megatron-core's version switches

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="shims apply only without CUDA")


_ABSENT = object()


def _entries(owner) -> dict:
    return owner if isinstance(owner, dict) else vars(owner)


def _get(owner, name):
    if isinstance(owner, dict):
        return owner.get(name, _ABSENT)
    return getattr(owner, name, _ABSENT)


def _snapshot():
    return {(id(owner), name): (name in _entries(owner), _entries(owner).get(name),
                                _get(owner, name))
            for owner, name in cpu_shims.shim_targets()}


def test_apply_is_idempotent_and_remove_restores_every_attribute():
    assert not cpu_shims.cpu_shims_applied()
    before = _snapshot()
    values = {(id(o), n) for o, n in cpu_shims.value_shim_targets()}
    assert cpu_shims.apply_cpu_shims() is True
    assert cpu_shims.apply_cpu_shims() is False  # idempotent
    for owner, name in cpu_shims.shim_targets():
        patched = _get(owner, name)
        if (id(owner), name) in values:  # plain values: True, a module, a stand-in class
            assert patched is not _ABSENT and patched is not before[(id(owner), name)][2]
            continue
        assert getattr(patched, "_megatron_offload_cpu_shim", False), f"{owner}.{name}"
        assert patched.__wrapped__ is before[(id(owner), name)][2]
    assert cpu_shims.remove_cpu_shims() is True
    assert cpu_shims.remove_cpu_shims() is False
    after = _snapshot()
    for key, (own, raw, value) in before.items():
        own2, raw2, value2 = after[key]
        assert own2 == own and raw2 is raw, key
        if own:
            assert value2 is value, key
        assert (value2 is _ABSENT) == (value is _ABSENT), key  # added names are gone again
    assert not cpu_shims.cpu_shims_applied()


def test_fused_wgrad_stand_in_is_installed_where_megatron_looks_and_removed_again():
    import sys

    from megatron.core.tensor_parallel import layers

    assert not layers._grad_accum_fusion_available  # no apex here
    assert not hasattr(layers, "fused_weight_gradient_mlp_cuda")
    with cpu_shims.cpu_shims():
        assert layers._grad_accum_fusion_available is True
        assert (layers.fused_weight_gradient_mlp_cuda
                is sys.modules["fused_weight_gradient_mlp_cuda"])
        import fused_weight_gradient_mlp_cuda  # what megatron.core.utils does by name

        assert (fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32
                is cpu_shims.wgrad_gemm_accum_fp32)
    assert layers._grad_accum_fusion_available is False
    assert not hasattr(layers, "fused_weight_gradient_mlp_cuda")
    assert "fused_weight_gradient_mlp_cuda" not in sys.modules


def test_wgrad_stand_in_does_the_kernels_arithmetic():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=gen)  # [s, b, in]
    g = torch.randn(3, 5, 6, generator=gen)  # [s, b, out]
    start = torch.randn(6, 8, generator=gen)
    main_grad = start.clone()
    cpu_shims.wgrad_gemm_accum_fp32(x, g, main_grad)
    assert torch.equal(main_grad, torch.addmm(start, g.reshape(-1, 6).t(), x.reshape(-1, 8)))
    torch.testing.assert_close(main_grad, start + g.reshape(-1, 6).t() @ x.reshape(-1, 8))
    # bf16 activations into an fp32 main_grad: widened exactly, accumulated in fp32
    main_grad = start.clone()
    cpu_shims.wgrad_gemm_accum_fp32(x.bfloat16(), g.bfloat16(), main_grad)
    expected = torch.addmm(start, g.bfloat16().float().reshape(-1, 6).t(),
                           x.bfloat16().float().reshape(-1, 8))
    assert torch.equal(main_grad, expected)
    # 16-bit main_grad: fp32 GEMM, one rounding
    half = start.bfloat16()
    cpu_shims.wgrad_gemm_accum_fp16(x.bfloat16(), g.bfloat16(), half)
    assert torch.equal(half, torch.addmm(start.bfloat16().float(),
                                         g.bfloat16().float().reshape(-1, 6).t(),
                                         x.bfloat16().float().reshape(-1, 8)).bfloat16())
    with pytest.raises(RuntimeError, match="fp32 main_grad"):
        cpu_shims.wgrad_gemm_accum_fp32(x, g, start.bfloat16())
    with pytest.raises(RuntimeError, match="do not fit"):
        cpu_shims.wgrad_gemm_accum_fp32(x, g, torch.zeros(8, 6))


def test_megatron_fused_linear_backward_accumulates_into_main_grad():
    """Megatron's own LinearWithGradAccumulationAndAsyncCommunication with fusion on: the
    stand-in adds g^T x into main_grad, the Parameter is flagged, no .grad is produced."""
    from megatron.core.tensor_parallel.layers import (
        linear_with_grad_accumulation_and_async_allreduce,
    )

    gen = torch.Generator().manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(6, 8, generator=gen))
    weight.main_grad = torch.ones(6, 8)
    weight.grad_added_to_main_grad = False
    x = torch.randn(4, 2, 8, generator=gen, requires_grad=True)
    with cpu_shims.cpu_shims():
        calls = cpu_shims.fused_wgrad_calls()["fp32"]
        out = linear_with_grad_accumulation_and_async_allreduce(
            x, weight, None, gradient_accumulation_fusion=True, allreduce_dgrad=False,
            sequence_parallel=False)
        g = torch.randn(out.shape, generator=gen)
        out.backward(g)
        assert cpu_shims.fused_wgrad_calls()["fp32"] == calls + 1
    expected = torch.addmm(torch.ones(6, 8), g.reshape(-1, 6).t(), x.detach().reshape(-1, 8))
    assert torch.equal(weight.main_grad, expected)
    assert weight.grad_added_to_main_grad is True
    assert weight.grad is not None  # Megatron's dummy wgrad (DDP's hook drops it)


def test_te_stand_ins_let_checkpoint_without_output_run():
    """megatron-core 0.16.1: CheckpointWithoutOutput() takes its FP8 branch (fp8=False is
    'not None') and needs TE names; with the stand-ins it runs and recomputes exactly."""
    from megatron.core.tensor_parallel import random as mrandom

    assert not hasattr(mrandom, "FP8GlobalStateManager")  # no TE here
    with cpu_shims.cpu_shims():
        x = torch.randn(4, 8, requires_grad=True)
        ckpt = mrandom.CheckpointWithoutOutput()
        y = ckpt.checkpoint(torch.nn.functional.gelu, x)
        z = (y * 3).sum()  # the multiplication saves nothing of y; a matmul would
        w = torch.randn(8, 8)
        out = (y @ w).sum() + z
        ckpt.discard_output_and_register_recompute(out)
        assert y.untyped_storage().nbytes() == 0
        out.backward()
        ref_x = x.detach().clone().requires_grad_()
        ref_y = torch.nn.functional.gelu(ref_x)
        ((ref_y @ w).sum() + (ref_y * 3).sum()).backward()
        assert torch.equal(x.grad, ref_x.grad)
    assert not hasattr(mrandom, "FP8GlobalStateManager")


def test_cuda_tensor_type_names_is_scoped():
    t = torch.zeros(2, dtype=torch.bfloat16)
    assert t.type() == "torch.BFloat16Tensor"
    with cpu_shims.cuda_tensor_type_names():
        with cpu_shims.cuda_tensor_type_names():  # reentrant
            assert t.type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float32).dtype == torch.float32  # conversions unchanged
    assert t.type() == "torch.BFloat16Tensor"
    assert "type" not in vars(torch.Tensor)


def test_patched_behaviour_and_context_manager():
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import random as mrandom

    original_p2p = p2p_communication._p2p_ops
    with cpu_shims.cpu_shims() as applied:
        assert applied
        assert torch.cuda.current_device() == torch.device("cpu")
        t = torch.ones(3)
        assert t.cuda() is t
        z = schedules.torch.zeros([], dtype=torch.int, device="cuda")
        assert z.device.type == "cpu" and schedules.torch.Tensor is torch.Tensor
        from megatron.core.optimizer import clip_grads
        from megatron.core.optimizer import optimizer as mopt

        assert mopt.torch.tensor([1.0], device="cuda").device.type == "cpu"
        norm, _ = clip_grads.l2_norm_impl(None, None, [[torch.ones(4), torch.ones(5)]], False)
        assert norm.device.type == "cpu" and float(norm) == 3.0
        torch.cuda.synchronize()
        torch.cuda.manual_seed(5)
        state = mrandom._get_cuda_rng_state()
        cpu_state = torch.get_rng_state()
        torch.cuda.manual_seed(6)
        assert not torch.equal(state, torch.cuda.get_rng_state())
        mrandom._set_cuda_rng_state(state)
        assert torch.equal(torch.cuda.get_rng_state(), state)
        assert torch.equal(torch.get_rng_state(), cpu_state)  # global CPU RNG untouched
        if FACTS.interleaved_waits_on_sends:  # 0.18+: Megatron waits on the send itself
            assert p2p_communication._p2p_ops is original_p2p
        else:
            assert p2p_communication._p2p_ops.__wrapped__ is original_p2p
        if FACTS.checkpoint_without_output_shares_storage:  # 0.17+: no C++ build on CPU
            dst, src = torch.zeros(4), torch.arange(4.0)
            dst.untyped_storage().resize_(0)
            version = dst._version
            mrandom._get_share_storage()(dst, src)
            assert torch.equal(dst, src) and dst._version == version
        if FACTS.grad_sync_reads_current_stream:  # 0.19
            from megatron.core.distributed import param_and_grad_buffer

            stream = param_and_grad_buffer.torch.cuda.current_stream()
            stream.wait_event(None)
            assert param_and_grad_buffer.torch.cuda.current_device() == torch.device("cpu")
        with cpu_shims.cpu_shims() as nested:
            assert not nested  # already applied: the inner one must not remove
        assert cpu_shims.cpu_shims_applied()
    assert not cpu_shims.cpu_shims_applied()
    assert schedules.torch is torch
    assert p2p_communication._p2p_ops is original_p2p
    assert "cuda" not in vars(torch.Tensor)


def test_without_send_keepalive_leaves_p2p_ops_alone():
    from megatron.core.pipeline_parallel import p2p_communication

    original = p2p_communication._p2p_ops
    with cpu_shims.cpu_shims(keep_async_send_storage=False):
        assert p2p_communication._p2p_ops is original
        assert cpu_shims.applied_options() == {"keep_async_send_storage": False}
    assert cpu_shims.applied_options() == {}
