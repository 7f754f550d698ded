"""Megatron-LM's training loop (``megatron.training``: pretrain, initialize, checkpoints) on a
CPU-only machine, on top of the megatron-core shims of :mod:`megatron_offload.integration.cpu.core`.

``apply_training_shims()`` does nothing when ``torch.cuda.is_available()``; every patch is one
attribute on one owner, in patch set ``training_shims`` (the
:class:`~megatron_offload.integration.patching.PatchSet` registry, which also holds the
entered function mode), and ``remove_training_shims()`` restores the originals (same
objects). Patches, in the order the obstacles appear in ``pretrain()`` (the releases that
ship ``megatron/training``: ``Release.ships_megatron_training``; a target a release lacks is
skipped):

``megatron.training.training.initialize_megatron`` -> called with ``allow_no_cuda=True``
    ``pretrain`` calls it without the argument and it asserts ``torch.cuda.is_available()``.
``megatron.training.initialize.torch`` -> a proxy whose ``cuda.device_count()`` is 1 and
    ``cuda.set_device`` a no-op
    ``_initialize_distributed`` builds the model-parallel groups, and ``_set_random_seed`` the
    model-parallel RNG tracker, only when ``torch.cuda.device_count() > 0``. Only this
    module's name binding changes.
``megatron.training.initialize._warmup_jit_function`` -> no-op
    ``set_jit_fusion_options`` warms the fused bias-GeLU / bias-dropout kernels up with
    ``device="cuda"`` tensors.
a ``TorchFunctionMode`` (pushed while applied): a CUDA ``device=`` becomes CPU,
    ``Tensor.cuda()`` returns the tensor, ``Tensor.to("cuda")`` goes to CPU
    ``training.py`` creates its bookkeeping tensors (start times, loss sums, eval counts,
    train/valid/test flags) with ``device='cuda'`` in a dozen places and moves models with
    ``model.cuda(...)``; one mode covers them all. It maps nothing that is not CUDA.
``torch.cuda.{Stream,current_stream,stream}`` -> CPU stand-ins
    ``get_model`` (and ``training/models/dist_utils.py``) wraps the DDP set-up in a
    dedicated CUDA stream; on CPU there is one stream of work, so waits are no-ops and the
    context manager does nothing.
``torch.cuda.set_rng_state`` -> sets the private generator of ``cpu.core``
    ``load_checkpoint`` restores the saved "CUDA" RNG state (which ``cpu.core`` took from that
    generator), so a resumed run continues the same random streams.
``megatron.training.training.get_megatron_optimizer`` -> builds, and every ``step()`` of the
    optimizer it returns runs, under ``cpu.core.cuda_tensor_type_names()``
    megatron-core's optimizers sort parameters by ``param.type() == 'torch.cuda.FloatTensor'``
    and ``clip_grad_by_total_norm_fp32`` asserts it; only building and stepping see the
    CUDA type names, never the forward or backward.

Compiling the dataset helpers (``_compile_dependencies`` runs ``make``, and the wheel has
no Makefile) is not CPU-specific: :mod:`megatron_offload.integration.megatron_lm` handles it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_offload.integration.cpu import core
from megatron_offload.integration.patching import Patch, PatchSet

log = logging.getLogger(__name__)

_MARKER = "_megatron_offload_training_shim"


# ------------------------------------------------------------------------ CUDA -> CPU mode
def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Torch calls that name a CUDA device run on CPU instead; nothing else changes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        device = kwargs.get("device")
        if device is not None and (_is_cuda(device) or isinstance(device, int)):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and (
            _is_cuda(args[1]) or (isinstance(args[1], int) and not isinstance(args[1], bool))
        ):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


# ------------------------------------------------------------------ stream stand-ins
class CpuStream:
    """``torch.cuda.Stream`` on a machine whose work runs in order on one CPU stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> Any:
        return event

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = CpuStream()


def _cuda_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    """Loading a checkpoint restores the "CUDA" RNG state into the private CPU generator that
    ``cpu.core`` gave ``torch.cuda.get_rng_state`` / ``manual_seed``."""
    core._CPU_RNG.set_state(new_state)


def _current_stream(device: Any = None) -> CpuStream:
    return _DEFAULT_STREAM


def _stream(stream: Any = None):
    return contextlib.nullcontext(stream)


# --------------------------------------------------------------- initialize's torch view
class _CudaView:
    """``torch.cuda`` as ``megatron.training.initialize`` should see it: one device."""

    def device_count(self) -> int:
        return 1

    def set_device(self, device: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchView:
    """``torch`` with ``cuda`` replaced by :class:`_CudaView`; every other name is torch's."""

    cuda = _CudaView()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<megatron_offload.integration.cpu: torch with one (CPU) device>"


# ------------------------------------------------------------------------- the patch table
def _initialize_megatron(original):
    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    return initialize_megatron


def _no_jit_warmup(original):
    @functools.wraps(original)
    def _warmup_jit_function(*args, **kwargs):
        log.debug("megatron_offload.integration.cpu: JIT warm-up skipped (no GPU)")

    return _warmup_jit_function


def _optimizer_with_cuda_type_names(original):
    @functools.wraps(original)
    def get_megatron_optimizer(*args, **kwargs):
        with core.cuda_tensor_type_names():
            optimizer = original(*args, **kwargs)
        step = optimizer.step

        @functools.wraps(step)
        def step_with_cuda_type_names(*a, **k):
            with core.cuda_tensor_type_names():
                return step(*a, **k)

        optimizer.step = step_with_cuda_type_names
        return optimizer

    return get_megatron_optimizer


def _patches() -> list[Patch]:
    """The rows of patch set ``training_shims``; targets a release lacks are skipped."""
    from megatron.training import initialize, training

    return [
        Patch.function(training, "initialize_megatron", _initialize_megatron, missing="skip"),
        Patch.proxy(initialize, "torch", lambda original: _TorchView(), missing="skip"),
        Patch.function(initialize, "_warmup_jit_function", _no_jit_warmup, missing="skip"),
        Patch.function(training, "get_megatron_optimizer", _optimizer_with_cuda_type_names,
                       missing="skip"),
        Patch.stand_in(torch.cuda, "set_rng_state", _cuda_set_rng_state, missing="skip"),
        Patch.value(torch.cuda, "Stream", CpuStream, missing="skip"),
        Patch.stand_in(torch.cuda, "current_stream", _current_stream, missing="skip"),
        Patch.stand_in(torch.cuda, "stream", _stream, missing="skip"),
    ]


_LOCK = threading.Lock()
_SHIMS = PatchSet("training_shims", marker=_MARKER)


def training_shims_applied() -> bool:
    return _SHIMS.installed


def apply_training_shims() -> bool:
    """Patch ``megatron.training`` so ``pretrain()`` runs without CUDA (see the module
    docstring). Applies :func:`megatron_offload.integration.cpu.core.apply_cpu_shims` first.
    Does nothing and returns False when a GPU is present or when already applied."""
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _SHIMS.installed:
            return False
        core.apply_cpu_shims()
        _SHIMS.install(_patches())
        _SHIMS.enter(CudaToCpuMode(), "torch function mode CudaToCpuMode")
        return True


def remove_training_shims() -> bool:
    """Undo :func:`apply_training_shims` (and the megatron-core shims it applied)."""
    with _LOCK:
        if not _SHIMS.restore():  # the function mode first, then the attributes, last first
            return False
        core.remove_cpu_shims()
        return True


__all__ = [
    "apply_training_shims", "remove_training_shims", "training_shims_applied", "CudaToCpuMode",
    "CpuStream",
]
