"""Reversible shims that let megatron-core 0.16.x train on a CPU-only machine (gloo).

Only for tests, the demo and CPU runs: ``apply_cpu_shims()`` does nothing when
``torch.cuda.is_available()`` is True. Every patch is one attribute replaced on one owner;
the original is kept (as the replacement's ``__wrapped__`` and in a private registry) and
``remove_cpu_shims()`` puts every original back, exactly (same object identity).

Patches, in the order they are applied (see ``_PATCHES``):

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
``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``
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
    module global by ``P2PCommunicator._communicate`` on every call.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

_MARKER = "_megatron_offload_cpu_shim"


@dataclass(slots=True)
class _Applied:
    owner: Any
    name: str
    original: Any
    replacement: Any
    own: bool
    """Whether the owner held the attribute itself (else it was inherited: delete on remove)."""


_LOCK = threading.Lock()
_APPLIED: list[_Applied] = []
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
    """Stands in for ``torch`` inside ``megatron.core.pipeline_parallel.schedules``.

    ``zeros(..., device="cuda")`` allocates on CPU; every other attribute is ``torch``'s.
    """

    def __init__(self, real_torch):
        object.__setattr__(self, "_real", real_torch)

    def zeros(self, *args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return self._real.zeros(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __repr__(self) -> str:
        return f"<cpu-shim proxy of {self._real!r}>"


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

def _targets(keep_async_send_storage: bool) -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """(owner, attribute, make_replacement(original)) for every shim, imported lazily."""
    try:
        from megatron.core.pipeline_parallel import p2p_communication, schedules
        from megatron.core.tensor_parallel import random as mcore_random
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "megatron_offload.testing.cpu_shims needs megatron.core.pipeline_parallel."
            "schedules, .p2p_communication and megatron.core.tensor_parallel.random "
            f"(written against megatron-core 0.16.x; the installed version may differ): {exc}"
        ) from exc
    for owner, name in ((mcore_random, "_get_cuda_rng_state"),
                        (mcore_random, "_set_cuda_rng_state"),
                        (p2p_communication, "_p2p_ops"), (schedules, "torch")):
        if not hasattr(owner, name):
            raise ImportError(
                f"{owner.__name__}.{name} not found: cpu_shims targets megatron-core 0.16.x; "
                "the installed megatron-core version may differ"
            )
    targets = [
        (torch.cuda, "current_device", lambda orig: _current_device),
        (torch.cuda, "get_rng_state", lambda orig: _cuda_get_rng_state),
        (torch.cuda, "manual_seed", lambda orig: _cuda_manual_seed),
        (mcore_random, "_get_cuda_rng_state", lambda orig: _mcore_get_cuda_rng_state),
        (mcore_random, "_set_cuda_rng_state", lambda orig: _mcore_set_cuda_rng_state),
        (schedules, "torch", lambda orig: _TorchWithCpuZeros(orig)),
        (torch.cuda, "synchronize", lambda orig: _synchronize),
        (torch.Tensor, "cuda", lambda orig: _tensor_cuda),
    ]
    if keep_async_send_storage:
        targets.append((p2p_communication, "_p2p_ops", _make_keepalive_p2p_ops))
    return targets


def _mark(replacement: Any, original: Any) -> Any:
    # Plain functions get a fresh wrapper per application so that ``__wrapped__`` names the
    # exact original; the proxy object carries the marker itself.
    if isinstance(replacement, _TorchWithCpuZeros):
        object.__setattr__(replacement, _MARKER, True)
        object.__setattr__(replacement, "__wrapped__", original)
        return replacement

    @functools.wraps(replacement)
    def shim(*args, **kwargs):
        return replacement(*args, **kwargs)

    shim.__wrapped__ = original
    setattr(shim, _MARKER, True)
    return shim


def cpu_shims_applied() -> bool:
    """Whether ``apply_cpu_shims`` is in effect in this process."""
    return bool(_APPLIED)


def applied_options() -> dict[str, bool]:
    """The keyword options of the ``apply_cpu_shims`` call in effect ({} when none)."""
    return dict(_OPTIONS)


def apply_cpu_shims(*, keep_async_send_storage: bool = True) -> bool:
    """Patch torch and megatron-core so that megatron-core 0.16.x runs without CUDA.

    Does nothing and returns False when a GPU is present or the shims are already applied
    (idempotent). Returns True when it patched. ``keep_async_send_storage=False`` leaves out
    the Trap 2 fix (only to demonstrate that the fix is needed). See the module docstring
    for each replaced symbol and the callers it reaches.
    """
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _APPLIED:
            return False
        for owner, name, make in _targets(keep_async_send_storage):
            own = name in vars(owner)
            original = vars(owner)[name] if own else getattr(owner, name)
            replacement = _mark(make(getattr(owner, name)), original)
            setattr(owner, name, replacement)
            _APPLIED.append(_Applied(owner, name, original, replacement, own))
            log.debug("cpu shim: %s.%s replaced", getattr(owner, "__name__", owner), name)
        _OPTIONS["keep_async_send_storage"] = keep_async_send_storage
        return True


def remove_cpu_shims() -> bool:
    """Restore every attribute ``apply_cpu_shims`` replaced. Returns whether it restored."""
    with _LOCK:
        if not _APPLIED:
            return False
        while _APPLIED:
            applied = _APPLIED.pop()
            if applied.own:
                setattr(applied.owner, applied.name, applied.original)
            else:
                delattr(applied.owner, applied.name)
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


def shim_targets() -> list[tuple[Any, str]]:
    """(owner, attribute) of every shim, for tests and diagnostics."""
    return [(owner, name) for owner, name, _ in _targets(True)]


__all__ = [
    "apply_cpu_shims", "remove_cpu_shims", "cpu_shims", "cpu_shims_applied", "applied_options",
    "shim_targets",
]
