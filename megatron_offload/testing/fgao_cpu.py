"""Megatron's fine-grained activation offloading (FGAO) on CPU, for comparisons only.

``fgao_stand_ins()`` is a context manager that lets megatron-core's
``pipeline_parallel.fine_grained_activation_offload`` run without CUDA (as the design notes
"Megatron's fine-grained offloading run on CPU" describe): the module's ``torch`` is
replaced by a proxy whose ``cuda`` has no-op ``Stream`` / ``Event`` / ``stream()`` /
``current_stream()`` and whose ``empty`` ignores ``pin_memory``; ``Tensor.record_stream``
is a no-op; the manager's "is this a CUDA tensor" check accepts CPU tensors; the NVTX
helpers do nothing; and ``megatron.core.extensions.transformer_engine.cpu_offload`` is an
object with ``CPUOffloadEnabled = False``. Everything is restored on exit.
"""
from __future__ import annotations

import contextlib
import types

import torch

DENSE_MODULES = ["attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm"]
"""All dense-model modules FGAO can offload (megatron-core 0.19.2's allowed list minus MoE)."""


class _NoStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        return None

    def wait_event(self, *a, **k):
        return None

    def record_event(self, event=None):
        return event if event is not None else _NoEvent()

    def synchronize(self):
        return None

    def query(self):
        return True


class _NoEvent(_NoStream):
    def record(self, *a, **k):
        return None

    def wait(self, *a, **k):
        return None


class _Cuda:
    Stream = _NoStream
    Event = _NoEvent

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def stream(s=None):
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(device=None):
        return _NoStream()

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def empty_cache():
        return None


class _Torch:
    def __init__(self, real):
        self._real = real
        self.cuda = _Cuda(real.cuda)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def empty(self, *a, pin_memory=False, device=None, **k):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return self._real.empty(*a, device=device, **k)


@contextlib.contextmanager
def fgao_stand_ins():
    from megatron.core.pipeline_parallel import fine_grained_activation_offload as fgao

    undo = []

    def patch(obj, name, value):
        had = hasattr(obj, name)
        old = getattr(obj, name, None)
        setattr(obj, name, value)
        undo.append((obj, name, had, old))

    patch(fgao, "torch", _Torch(torch))
    patch(fgao, "nvtx_range_push", lambda *a, **k: None)
    patch(fgao, "nvtx_range_pop", lambda *a, **k: None)
    patch(torch.Tensor, "record_stream", lambda self, stream=None: None)
    for cls in vars(fgao).values():
        if isinstance(cls, type) and "_can_manage_tensor_for_offload" in vars(cls):
            def _can(tensor, _torch=torch):
                stray = isinstance(tensor, (_torch._subclasses.fake_tensor.FakeTensor,
                                            _torch._subclasses.functional_tensor.FunctionalTensor))
                return not isinstance(tensor, _torch.nn.Parameter) and not stray
            patch(cls, "_can_manage_tensor_for_offload", staticmethod(_can))
    try:
        from megatron.core.extensions import transformer_engine as te_ext
        patch(te_ext, "cpu_offload", types.SimpleNamespace(CPUOffloadEnabled=False))
    except ImportError:
        pass
    try:
        yield fgao
    finally:
        for obj, name, had, old in reversed(undo):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


__all__ = ["fgao_stand_ins", "DENSE_MODULES"]
