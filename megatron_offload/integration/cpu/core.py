"""Reversible shims that let the supported megatron-core releases (``releases.SUPPORTED_TEXT``)
train on a CPU-only machine (gloo).

Only for tests, the demo and CPU runs: ``apply_cpu_shims()`` does nothing when
``torch.cuda.is_available()`` is True. Every patch is one attribute replaced on one owner,
in patch set ``cpu_shims`` (the :class:`~megatron_offload.integration.patching.PatchSet`
registry): the original is kept (as the replacement's ``__wrapped__`` and in the set) and
``remove_cpu_shims()`` puts every original back, exactly (same object identity).

One code path for every supported release; where releases differ, the switch is a fact of
``megatron_offload.releases.RELEASES`` (the one place that knows Megatron's
versions), named below. Line references are to 0.16.1 unless said otherwise.

Patches, in the order they are applied (see ``_patches``):

``torch.cuda.current_device`` -> ``torch.device("cpu")``
    megatron-core allocates with ``device=torch.cuda.current_device()`` all over: the global
    memory buffer (``core/utils.py`` ``GlobalMemoryBuffer.get_tensor``), the grad buffers
    (``distributed/param_and_grad_buffer.py`` ``_ParamAndGradBuffer.__init__``), the p2p
    receive buffers (``pipeline_parallel/p2p_communication.py``
    ``P2PCommunicator._communicate`` / ``_communicate_shapes``). Returning the CPU device
    sends all of them to host memory.
``torch.cuda.get_rng_state``, ``torch.cuda.manual_seed``
    ``tensor_parallel/random.py`` ``CudaRNGStatesTracker.add`` and
    ``model_parallel_cuda_manual_seed`` call these to create the named RNG states
    ("model-parallel-rng", ...). They now act on one private CPU ``torch.Generator`` that
    nothing else uses (the global CPU generator is left alone).
``megatron.core.tensor_parallel.random.{_get_cuda_rng_state,_set_cuda_rng_state}``
    Used by ``CudaRNGStatesTracker.fork`` (every forward that forks the tracker) and by
    ``CheckpointFunction`` (full recompute) through ``_get_all_rng_states`` /
    ``_set_all_rng_states``; looked up as module globals at call time, so replacing the
    module attributes reaches every caller. Same private generator.
``megatron.core.pipeline_parallel.schedules.torch`` -> a proxy of ``torch``
    ``forward_backward_no_pipelining`` / ``..._without_interleaving`` /
    ``..._with_interleaving`` each create ``torch.zeros([], dtype=torch.int, device="cuda")``
    (``total_num_tokens``). The proxy's ``zeros`` maps a CUDA device to CPU; every other
    attribute is the real ``torch``'s. Only this module's name binding changes.
``torch.cuda.synchronize`` -> no-op
    ``p2p_communication.py`` calls it after batched p2p (``batch_p2p_sync``) and in
    ``_communicate_shapes``; ``parallel_state`` in a few teardown paths.
``torch.Tensor.cuda`` -> returns the tensor itself
    ``models/common/language_module/language_module.py``
    ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied word-embedding
    weight with ``weight.data.cuda()`` before all-reducing it across the embedding group
    (PP > 1 with shared embeddings).
``megatron.core.pipeline_parallel.p2p_communication._p2p_ops`` -> keeps send storage alive
    (Trap 2 of the CPU notes, only when ``keep_async_send_storage=True``, the default).
    With ``overlap_p2p_comm=True`` the interleaved schedule leaves ``isend`` requests in
    flight and, with ``deallocate_pipeline_outputs=True``, ``deallocate_output_tensor``
    swaps the sent output's ``.data`` for a 1-element placeholder (``schedules.py``
    ``forward_backward_pipelining_with_interleaving``), freeing the storage that gloo is
    still reading (gloo captured its data pointer at ``isend``). NCCL is protected by the
    CUDA caching allocator's stream tracking; gloo is not. The wrapper hands gloo a
    detached alias of each tensor to send (a second tensor on the same storage, which
    ``deallocate_output_tensor`` cannot swap) and wraps the returned request so that the
    alias stays referenced until ``wait()`` returns. No copy is made. Process groups that
    are not gloo go to the original function untouched. ``_p2p_ops`` is looked up as a
    module global by ``P2PCommunicator._communicate`` on every call. Bound only where the
    release lacks the upstream fix (``Release.interleaved_waits_on_sends``: 0.18+ waits on
    ``send_next_wait_handle`` before ``deallocate_output_tensor``).
``megatron.core.optimizer.{optimizer,clip_grads,distrib_optimizer,grad_scaler}.torch``
    -> the same proxy
    megatron-core's optimizers create their small state tensors with ``device='cuda'``:
    ``MixedPrecisionOptimizer.__init__`` (``found_inf``, ``_scale_one``), ``FP32Optimizer``
    (``_scale``), ``clip_grads.get_grad_norm_fp32`` / ``clip_grad_by_total_norm_fp32`` /
    ``count_zeros_fp32`` and the grad scalers. The proxy's ``zeros`` / ``ones`` /
    ``empty`` / ``full`` / ``tensor`` map a CUDA device to CPU.
``megatron.core.optimizer.clip_grads.l2_norm_impl`` -> the same arithmetic on CPU
    Without apex/TE it is ``megatron.core.utils.local_multi_tensor_l2_norm``, which ends in
    ``torch.tensor([...], device="cuda")``; the replacement computes the same norms and
    returns the result on CPU.
``sys.modules['fused_weight_gradient_mlp_cuda']`` and
``megatron.core.tensor_parallel.layers.{fused_weight_gradient_mlp_cuda,_grad_accum_fusion_available}``
    -> a CPU stand-in of apex's CUDA extension ``fused_weight_gradient_mlp_cuda``
    ``gradient_accumulation_fusion=True`` makes ``ColumnParallelLinear`` /
    ``RowParallelLinear`` refuse to build unless
    ``megatron.core.tensor_parallel.layers._grad_accum_fusion_available`` is True, and
    ``LinearWithGradAccumulationAndAsyncCommunication.backward`` then calls
    ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input, grad_output, main_grad)``
    (``..._fp16`` for a 16-bit ``main_grad``) through the module global of ``layers``;
    ``megatron.core.utils.drain_embedding_wgrad_compute`` imports the module by name. The
    shims set ``layers._grad_accum_fusion_available = True``, bind
    ``layers.fused_weight_gradient_mlp_cuda`` (absent before: removed again on restore)
    and put the stand-in in ``sys.modules`` (likewise). The stand-in does the kernel's
    arithmetic: one GEMM with beta = 1, ``main_grad += grad_output_2d^T @ input_2d``,
    accumulated in fp32 (inputs of any float dtype are widened exactly to fp32; for a 16-bit
    ``main_grad`` the fp32 result is rounded back once), like apex's cuBLAS call with
    ``CUBLAS_COMPUTE_32F``.
``megatron.core.tensor_parallel.random.{FP8GlobalStateManager,fp8_autocast,activation_recompute_forward}``
    -> what Transformer Engine does with FP8 off (bound only where TE is absent). In
    megatron-core 0.16.1 ``CheckpointWithoutOutput(fp8=False)`` sets ``self.fp8 = fp8 is not
    None``, i.e. True, so every ``CheckpointWithoutOutput()`` built without arguments
    (``TransformerLayer`` for ``recompute_modules`` "layernorm", the MoE experts for
    "moe_act") takes its FP8 branch and calls these three TE names, which the module only
    imports when TE is installed: without TE the first forward dies with ``NameError: name
    'FP8GlobalStateManager' is not defined`` (``random.py:589``). The stand-ins answer as TE
    does when FP8 is not enabled: ``is_fp8_enabled()`` False, ``get_fp8_recipe()`` None,
    ``fp8_autocast(enabled=False, ...)`` and ``activation_recompute_forward(...)`` empty
    context managers (TE's sets flags that only TE modules read; a local-spec model has
    none).
``megatron.core.transformer.moe.moe_utils.te_general_gemm`` -> None (bound only where TE
    is absent). ``RouterGatingLinearFunction`` (every MoE router's gating GEMM) tests
    ``if te_general_gemm is not None`` but the name is only imported with TE, so without TE
    the first MoE forward dies with ``NameError: name 'te_general_gemm' is not defined``
    (``moe_utils.py:1192``). None is what the test expects for "no TE": the router then
    takes its own ``torch.mm`` / ``torch.addmm`` path.

``megatron.core.tensor_parallel.random._get_share_storage`` -> a storage-level copy (0.17+,
    ``Release.checkpoint_without_output_shares_storage``). ``CheckpointWithoutOutput.
    _recompute`` gives the recomputed output back to the released output tensor through a C++
    extension that ``torch.utils.cpp_extension.load_inline`` compiles on first use (it needs
    ninja, a C++ compiler and Python headers, and about 20 s on 2 cores). The stand-in resizes
    the released storage and copies the recomputed bytes into it at the storage level, as
    0.16.1 did: no version-counter bump, every view sees the bytes, same values; it copies
    where the extension aliases.
``megatron.core.distributed.param_and_grad_buffer.torch`` -> the proxy, with
    ``torch.cuda.current_stream()`` a no-op stream (0.19, ``Release.
    grad_sync_reads_current_stream``): ``_ParamAndGradBucketGroup.start_grad_sync`` waits on
    CUDA-graph wgrad events of the current stream on every grad sync.

Not applied globally, but available as a context manager (patch set ``cuda tensor type
names``): ``cuda_tensor_type_names()`` replaces ``torch.Tensor.type`` so that ``type()`` (no
arguments) of a CPU tensor answers ``torch.cuda.<T>Tensor``.
megatron-core's mixed-precision and distributed optimizers sort parameters by comparing
``param.type()`` with ``'torch.cuda.BFloat16Tensor'`` etc. (``optimizer.py``
``Float16OptimizerWithFloat16Params.__init__``, ``distrib_optimizer.py``
``_build_model_and_main_param_groups``) and ``clip_grad_by_total_norm_fp32`` asserts
``param.grad.type() == 'torch.cuda.FloatTensor'``. The runner enters it around building
and stepping the optimizer only, because a global lie about the device would also reach
every other caller of ``Tensor.type()``.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_offload.integration.patching import Item, Patch, PatchSet
from megatron_offload.releases import SUPPORTED_TEXT, release

_MARKER = "_megatron_offload_cpu_shim"

_LOCK = threading.Lock()
_SHIMS = PatchSet("cpu_shims", marker=_MARKER)
_OPTIONS: dict[str, bool] = {}

# The private generator behind the model-parallel RNG tracker on CPU. Nothing draws from it
# in the tiny models we run (dropout 0), but every state the tracker forks, saves and
# restores lives here and not in the process-wide CPU generator.
_CPU_RNG = torch.Generator(device="cpu")


# --- replacements -------------------------------------------------------------------------

def _current_device() -> torch.device:
    return torch.device("cpu")


def _cuda_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return _CPU_RNG.get_state()


def _cuda_manual_seed(seed: int) -> None:
    _CPU_RNG.manual_seed(int(seed))


def _mcore_get_cuda_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return _CPU_RNG.get_state()


def _mcore_set_cuda_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    _CPU_RNG.set_state(new_state)


def _synchronize(device: Any = None) -> None:
    return None


def _tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False,
                 memory_format: Any = None) -> torch.Tensor:
    return self


def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _TorchWithCpuZeros:
    """Stands in for ``torch`` inside one megatron-core module (schedules, optimizers).

    ``zeros`` / ``ones`` / ``empty`` / ``full`` / ``tensor`` with a CUDA ``device=``
    allocate on CPU; every other attribute is ``torch``'s.
    """

    def __init__(self, real_torch):
        object.__setattr__(self, "_real", real_torch)

    def _factory(self, name, args, kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return getattr(self._real, name)(*args, **kwargs)

    def zeros(self, *args, **kwargs):
        return self._factory("zeros", args, kwargs)

    def ones(self, *args, **kwargs):
        return self._factory("ones", args, kwargs)

    def empty(self, *args, **kwargs):
        return self._factory("empty", args, kwargs)

    def full(self, *args, **kwargs):
        return self._factory("full", args, kwargs)

    def tensor(self, *args, **kwargs):
        return self._factory("tensor", args, kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __repr__(self) -> str:
        return f"<cpu-shim proxy of {self._real!r}>"


class _NoStream:
    """A CUDA stream stand-in on CPU: waiting and recording are no-ops (CPU work is
    synchronous)."""

    def wait_event(self, event: Any = None) -> None:
        return None

    def wait_stream(self, stream: Any = None) -> None:
        return None

    def record_event(self, event: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None


_NO_STREAM = _NoStream()


class _CudaWithNoStreams:
    """``torch.cuda`` as one megatron-core module sees it: ``current_stream()`` is a
    :class:`_NoStream`; every other attribute is the real ``torch.cuda``'s."""

    def __init__(self, real_cuda):
        object.__setattr__(self, "_real", real_cuda)

    def current_stream(self, device: Any = None) -> _NoStream:
        return _NO_STREAM

    def __getattr__(self, name):
        return getattr(self._real, name)


class _TorchWithCpuStreams(_TorchWithCpuZeros):
    """The ``_TorchWithCpuZeros`` proxy whose ``torch.cuda.current_stream()`` is a no-op
    stream (for ``distributed/param_and_grad_buffer.py``)."""

    @property
    def cuda(self):
        return _CudaWithNoStreams(self._real.cuda)


def _share_storage_by_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """CPU stand-in of megatron-core 0.17+'s ``share_storage`` C++ extension: give ``dst``'s
    (released, zero-byte) storage ``src``'s bytes, at the storage level (no version-counter
    bump, every view of ``dst`` sees them). It copies instead of aliasing: what 0.16's
    ``CheckpointWithoutOutput._recompute`` did (``resize_`` + ``copy_`` of the untyped
    storage). Values, and therefore every gradient, are the same."""
    storage = dst.untyped_storage()
    source = src.untyped_storage()
    storage.resize_(source.nbytes())
    storage.copy_(source)


def _get_share_storage_stand_in():
    return _share_storage_by_copy


def _local_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron.core.utils.local_multi_tensor_l2_norm with its result left on CPU."""
    l2 = [[torch.norm(tensor) for tensor in tensor_list] for tensor_list in tensor_lists]
    l2_reduced = torch.norm(torch.tensor(l2))
    return torch.tensor([float(l2_reduced)], dtype=torch.float), None


# --- fused_weight_gradient_mlp_cuda stand-in ----------------------------------------------

def _wgrad_operands(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor):
    x = input.reshape(-1, input.shape[-1])
    g = grad_output.reshape(-1, grad_output.shape[-1])
    if x.shape[0] != g.shape[0] or tuple(main_grad.shape) != (g.shape[1], x.shape[1]):
        raise RuntimeError(
            f"wgrad_gemm_accum: shapes input {tuple(input.shape)}, grad_output "
            f"{tuple(grad_output.shape)}, main_grad {tuple(main_grad.shape)} do not fit "
            "main_grad[out, in] += grad_output[tokens, out]^T @ input[tokens, in]"
        )
    if x.dtype != g.dtype:
        raise RuntimeError(f"wgrad_gemm_accum: input {x.dtype} and grad_output {g.dtype} differ")
    return x.to(torch.float32), g.to(torch.float32)


_FUSED_WGRAD_CALLS = {"fp32": 0, "fp16": 0}


def fused_wgrad_calls() -> dict[str, int]:
    """How often this process called the stand-in kernels (to show a run really used them)."""
    return dict(_FUSED_WGRAD_CALLS)


def wgrad_gemm_accum_fp32(input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """CPU stand-in of apex ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32``:
    ``main_grad (fp32) += grad_output^T @ input`` as one GEMM with beta = 1, fp32 accumulate."""
    if main_grad.dtype != torch.float32:
        raise RuntimeError(f"wgrad_gemm_accum_fp32 needs an fp32 main_grad, got {main_grad.dtype}")
    x, g = _wgrad_operands(input, grad_output, main_grad)
    main_grad.addmm_(g.t(), x)
    _FUSED_WGRAD_CALLS["fp32"] += 1


def wgrad_gemm_accum_fp16(input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """CPU stand-in of ``wgrad_gemm_accum_fp16``: the same GEMM for a 16-bit ``main_grad``,
    computed in fp32 and rounded to ``main_grad``'s dtype once."""
    if main_grad.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"wgrad_gemm_accum_fp16 needs a 16-bit main_grad, got {main_grad.dtype}")
    x, g = _wgrad_operands(input, grad_output, main_grad)
    main_grad.copy_(torch.addmm(main_grad.to(torch.float32), g.t(), x))
    _FUSED_WGRAD_CALLS["fp16"] += 1


FUSED_WGRAD_MODULE = "fused_weight_gradient_mlp_cuda"


class FP8GlobalStateManagerStandIn:
    """Transformer Engine's ``FP8GlobalStateManager`` as it answers with FP8 off."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe():
        return None


@contextlib.contextmanager
def _fp8_autocast_off(enabled: bool = False, fp8_recipe: Any = None, **kwargs: Any):
    if enabled:
        raise RuntimeError("cpu_shims: FP8 autocast needs Transformer Engine and a GPU")
    yield


@contextlib.contextmanager
def _activation_recompute_forward(activation_recompute: bool = False,
                                  recompute_phase: bool = False):
    yield


def _make_fused_wgrad_module() -> types.ModuleType:
    module = types.ModuleType(
        FUSED_WGRAD_MODULE, "CPU stand-in of apex's fused_weight_gradient_mlp_cuda "
        "(megatron_offload.integration.cpu.core)")
    module.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
    module.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16
    return module


_SYS_MODULES = Item(sys.modules, "sys.modules")


class _KeepAliveWork:
    """A p2p request that keeps the tensor it sends referenced until ``wait()`` returns."""

    __slots__ = ("_work", "_keep")

    def __init__(self, work, keep: torch.Tensor):
        self._work = work
        self._keep = keep

    def wait(self, *args, **kwargs):
        result = self._work.wait(*args, **kwargs)
        self._keep = None
        return result

    def __getattr__(self, name):
        return getattr(self._work, name)


def _make_keepalive_p2p_ops(original: Callable) -> Callable:
    @functools.wraps(original)
    def _p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                 group, prev_pipeline_rank, next_pipeline_rank):
        if torch.distributed.get_backend(group) != "gloo":
            return original(
                tensor_send_prev=tensor_send_prev, tensor_recv_prev=tensor_recv_prev,
                tensor_send_next=tensor_send_next, tensor_recv_next=tensor_recv_next,
                group=group, prev_pipeline_rank=prev_pipeline_rank,
                next_pipeline_rank=next_pipeline_rank,
            )
        # A detached alias shares the storage but is a different tensor object: swapping
        # the schedule's output ``.data`` later does not release the bytes gloo reads.
        send_prev = tensor_send_prev.detach() if tensor_send_prev is not None else None
        send_next = tensor_send_next.detach() if tensor_send_next is not None else None
        reqs = original(
            tensor_send_prev=send_prev, tensor_recv_prev=tensor_recv_prev,
            tensor_send_next=send_next, tensor_recv_next=tensor_recv_next,
            group=group, prev_pipeline_rank=prev_pipeline_rank,
            next_pipeline_rank=next_pipeline_rank,
        )
        if "send_prev" in reqs:
            reqs["send_prev"] = _KeepAliveWork(reqs["send_prev"], send_prev)
        if "send_next" in reqs:
            reqs["send_next"] = _KeepAliveWork(reqs["send_next"], send_next)
        return reqs

    return _p2p_ops


# --- the patch table ----------------------------------------------------------------------

def _patches(keep_async_send_storage: bool) -> list[Patch]:
    """The rows of patch set ``cpu_shims``, megatron-core imported lazily. An owner may be
    an ``Item`` (a mapping entry)."""
    facts = release()  # which megatron-core release: its version switches below
    try:
        from megatron.core.distributed import param_and_grad_buffer
        from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
        from megatron.core.optimizer import optimizer as mcore_optimizer
        from megatron.core.pipeline_parallel import p2p_communication, schedules
        from megatron.core.tensor_parallel import layers as mcore_layers
        from megatron.core.tensor_parallel import random as mcore_random
        from megatron.core.transformer.moe import moe_utils
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "megatron_offload.integration.cpu.core needs megatron.core.pipeline_parallel."
            "schedules, .p2p_communication, megatron.core.tensor_parallel.random / .layers "
            f"and megatron.core.optimizer (written against {SUPPORTED_TEXT}; the "
            f"installed version may differ): {exc}"
        ) from exc
    fused = _make_fused_wgrad_module()
    patches = [
        Patch.stand_in(torch.cuda, "current_device", _current_device),
        Patch.stand_in(torch.cuda, "get_rng_state", _cuda_get_rng_state),
        Patch.stand_in(torch.cuda, "manual_seed", _cuda_manual_seed),
        Patch.stand_in(mcore_random, "_get_cuda_rng_state", _mcore_get_cuda_rng_state),
        Patch.stand_in(mcore_random, "_set_cuda_rng_state", _mcore_set_cuda_rng_state),
        Patch.proxy(schedules, "torch", _TorchWithCpuZeros),
        Patch.stand_in(torch.cuda, "synchronize", _synchronize),
        Patch.stand_in(torch.Tensor, "cuda", _tensor_cuda),
        Patch.proxy(mcore_optimizer, "torch", _TorchWithCpuZeros),
        Patch.proxy(clip_grads, "torch", _TorchWithCpuZeros),
        Patch.proxy(distrib_optimizer, "torch", _TorchWithCpuZeros),
        Patch.proxy(grad_scaler, "torch", _TorchWithCpuZeros),
        Patch.stand_in(clip_grads, "l2_norm_impl", _local_multi_tensor_l2_norm),
        Patch.value(_SYS_MODULES, FUSED_WGRAD_MODULE, fused, missing="create"),
        Patch.value(mcore_layers, FUSED_WGRAD_MODULE, fused, missing="create"),
        Patch.value(mcore_layers, "_grad_accum_fusion_available", True),
    ]
    te_stand_ins = {
        "FP8GlobalStateManager": FP8GlobalStateManagerStandIn,
        "fp8_autocast": _fp8_autocast_off,
        "activation_recompute_forward": _activation_recompute_forward,
    }
    for name, stand_in in te_stand_ins.items():
        if not hasattr(mcore_random, name):  # TE absent: megatron-core never imported it
            patches.append(Patch.value(mcore_random, name, stand_in, missing="create"))
    if not hasattr(moe_utils, "te_general_gemm"):
        patches.append(Patch.value(moe_utils, "te_general_gemm", None, missing="create"))
    if keep_async_send_storage and not facts.interleaved_waits_on_sends:
        patches.append(Patch.function(p2p_communication, "_p2p_ops", _make_keepalive_p2p_ops))
    if facts.checkpoint_without_output_shares_storage:
        patches.append(Patch.stand_in(mcore_random, "_get_share_storage",
                                      _get_share_storage_stand_in))
    if facts.grad_sync_reads_current_stream:
        patches.append(Patch.proxy(param_and_grad_buffer, "torch", _TorchWithCpuStreams))
    return patches


def cpu_shims_applied() -> bool:
    """Whether ``apply_cpu_shims`` is in effect in this process."""
    return _SHIMS.installed


def applied_options() -> dict[str, bool]:
    """The keyword options of the ``apply_cpu_shims`` call in effect ({} when none)."""
    return dict(_OPTIONS)


def apply_cpu_shims(*, keep_async_send_storage: bool = True) -> bool:
    """Patch torch and megatron-core so that the supported megatron-core releases run
    without CUDA.

    Does nothing and returns False when a GPU is present or the shims are already applied
    (idempotent). Returns True when it patched. ``keep_async_send_storage=False`` leaves out
    the Trap 2 fix (only to demonstrate that the fix is needed). See the module docstring
    for each replaced symbol and the callers it reaches. A target the installed megatron-core
    lacks is refused (ImportError naming it) before anything is replaced.
    """
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _SHIMS.installed:
            return False
        _SHIMS.install(_patches(keep_async_send_storage))
        _OPTIONS["keep_async_send_storage"] = keep_async_send_storage
        return True


def remove_cpu_shims() -> bool:
    """Restore every attribute ``apply_cpu_shims`` replaced. Returns whether it restored."""
    with _LOCK:
        if not _SHIMS.restore():
            return False
        _OPTIONS.clear()
        return True


@contextlib.contextmanager
def cpu_shims(*, keep_async_send_storage: bool = True) -> Iterator[bool]:
    """``with cpu_shims() as applied:`` apply on enter, restore on exit if this call applied."""
    applied = apply_cpu_shims(keep_async_send_storage=keep_async_send_storage)
    try:
        yield applied
    finally:
        if applied:
            remove_cpu_shims()


def _owner(patch: Patch) -> Any:
    return patch.owner.mapping if isinstance(patch.owner, Item) else patch.owner


def shim_targets() -> list[tuple[Any, str]]:
    """(owner, attribute) of every shim, for tests and diagnostics. An owner that is a
    mapping entry (``sys.modules``) is given as the mapping itself (a ``dict``)."""
    return [(_owner(patch), patch.attribute) for patch in _patches(True)]


def value_shim_targets() -> list[tuple[Any, str]]:
    """The subset of ``shim_targets()`` whose replacement is a plain value (not marked)."""
    return [(_owner(patch), patch.attribute) for patch in _patches(True) if patch.kind == "value"]


_TYPE_LOCK = threading.Lock()
_TYPE_DEPTH = 0
_TYPE_NAMES = PatchSet("cuda tensor type names", marker=_MARKER)
"""Patch set of :func:`cuda_tensor_type_names`: ``torch.Tensor.type``."""


def _cuda_type_names(original):
    def type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = original(self)  # e.g. "torch.BFloat16Tensor"
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    return type


@contextlib.contextmanager
def cuda_tensor_type_names() -> Iterator[bool]:
    """While inside: ``t.type()`` of a CPU tensor says ``torch.cuda.<T>Tensor`` (see the
    module docstring). Reentrant; does nothing when a GPU is present (yields False)."""
    global _TYPE_DEPTH
    if torch.cuda.is_available():
        yield False
        return
    with _TYPE_LOCK:
        if _TYPE_DEPTH == 0:
            # ``type`` is inherited from torch._C.TensorBase: restored by deleting ours
            _TYPE_NAMES.install([Patch.function(torch.Tensor, "type", _cuda_type_names)])
        _TYPE_DEPTH += 1
    try:
        yield True
    finally:
        with _TYPE_LOCK:
            _TYPE_DEPTH -= 1
            if _TYPE_DEPTH == 0:
                _TYPE_NAMES.restore()


__all__ = [
    "apply_cpu_shims", "remove_cpu_shims", "cpu_shims", "cpu_shims_applied", "applied_options",
    "shim_targets", "value_shim_targets", "cuda_tensor_type_names", "wgrad_gemm_accum_fp32",
    "wgrad_gemm_accum_fp16", "fused_wgrad_calls", "FUSED_WGRAD_MODULE",
]
