"""The CPU shims patch what they say and restore every original exactly."""
import pytest
import torch

from megatron_offload.testing import cpu_shims

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="shims apply only without CUDA")


def _snapshot():
    return {(id(owner), name): (name in vars(owner), vars(owner).get(name), getattr(owner, name))
            for owner, name in cpu_shims.shim_targets()}


def test_apply_is_idempotent_and_remove_restores_every_attribute():
    assert not cpu_shims.cpu_shims_applied()
    before = _snapshot()
    assert cpu_shims.apply_cpu_shims() is True
    assert cpu_shims.apply_cpu_shims() is False  # idempotent
    for owner, name in cpu_shims.shim_targets():
        patched = getattr(owner, name)
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
    assert not cpu_shims.cpu_shims_applied()


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
        torch.cuda.synchronize()
        torch.cuda.manual_seed(5)
        state = mrandom._get_cuda_rng_state()
        cpu_state = torch.get_rng_state()
        torch.cuda.manual_seed(6)
        assert not torch.equal(state, torch.cuda.get_rng_state())
        mrandom._set_cuda_rng_state(state)
        assert torch.equal(torch.cuda.get_rng_state(), state)
        assert torch.equal(torch.get_rng_state(), cpu_state)  # global CPU RNG untouched
        assert p2p_communication._p2p_ops.__wrapped__ is original_p2p
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
