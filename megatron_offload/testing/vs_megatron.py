"""Pool task of ``benchmarks/vs_megatron_offload.py``: one offload variant, measured per rank.

``measure(case, variant, iterations=4, measure_iteration=2)`` runs in a pool worker like
``reference.run_case``: it builds the tiny GPT, trains ``iterations`` iterations (plain SGD),
and during ``measure_iteration`` runs everything under a ``TruePeakMeter`` (live activation
bytes after every aten op, and at every ``forward_step`` / ``backward_step`` boundary;
parameters, ``main_grad`` and DDP buffers excluded, host copies counted apart). The other
iterations after the first are timed without the meter. Variants:

- ``none``: no offload.
- ``plugin``: ``OffloadConfig(policy="full", min_offload_bytes=0)`` (unit granularity);
  its host pool buffers are counted as host bytes.
- ``layers``: the same with ``granularity="layer"`` (layer streaming).
- ``profile``: no offload (policy ``none``) but the plugin's layer hooks installed, and the
  measured iteration cut into the entries of the layer-level list (``TruePeakMeter.mark`` at
  every forward_step / backward_step / layer start and end): the per-entry measurements the
  simulator's :class:`~megatron_offload.schedule.layers.LayerProfile` is built from
  (``layer_profile``).
- ``fgao``: Megatron's fine-grained activation offloading with all dense modules
  (``fgao_cpu.DENSE_MODULES``, ``min_offloaded_tensor_size=0``) under the CPU stand-ins of
  ``fgao_cpu.fgao_stand_ins``; its host copies (``ChunkOffloadHandler.offload``) are
  counted as host bytes.
- ``bound``: a ``saved_tensors_hooks`` pack that moves every non-parameter saved tensor
  into a separate host copy (made untracked) and an unpack that "reloads" it into a fresh
  (tracked) copy: the offload-every-saved-tensor bound.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from megatron_offload.testing.gpt import TinyGPTCase, build_model
from megatron_offload.testing.reference import (
    _collect_grads,
    _one_iteration,
    _sgd_step,
    ensure_cpu_shims,
    init_parallel_state,
    release_parallel_state,
)
from megatron_offload.testing.true_peak import TruePeakMeter, _storage_key

VARIANTS = ("none", "fgao", "plugin", "layers", "bound", "profile")


def _static_tensors(chunks: list) -> list[torch.Tensor]:
    out = []
    for chunk in chunks:
        for p in chunk.parameters():
            out.append(p)
            if getattr(p, "main_grad", None) is not None:
                out.append(p.main_grad)
            if p.grad is not None:
                out.append(p.grad)
        for buf in getattr(chunk, "buffers", []) or []:
            for name in ("grad_data", "param_data"):
                t = getattr(buf, name, None)
                if isinstance(t, torch.Tensor):
                    out.append(t)
        for b in chunk.module.buffers() if hasattr(chunk, "module") else []:
            out.append(b)
    return out


@contextlib.contextmanager
def _step_boundaries(meter: TruePeakMeter, marks=None):
    from megatron.core.pipeline_parallel import schedules

    orig_f, orig_b = schedules.forward_step, schedules.backward_step

    def forward_step(*a, **k):
        meter.sample_boundary()
        try:
            return orig_f(*a, **k)
        finally:
            meter.sample_boundary()
            if marks is not None:
                marks.step_ended()

    def backward_step(*a, **k):
        meter.sample_boundary()
        try:
            return orig_b(*a, **k)
        finally:
            meter.sample_boundary()
            if marks is not None:
                marks.step_ended()

    schedules.forward_step, schedules.backward_step = forward_step, backward_step
    try:
        yield
    finally:
        schedules.forward_step, schedules.backward_step = orig_f, orig_b


class _EntryMarks:
    """Cuts the measured iteration into the layer-level list's entries: a segment per entry
    (from the runtime's entry listener), plus ``after:<entry>`` segments from a layer's end
    and from a step's end to whatever comes next (the epilogue, p2p)."""

    def __init__(self, meter: TruePeakMeter, runtime, chunks) -> None:
        from megatron_offload.integration.layers import transformer_layers

        self.meter, self.runtime = meter, runtime
        self.layers = [layer for chunk in chunks for layer in transformer_layers(chunk)]
        self.handles = []
        self.unit_entry = None

    def entry(self, entry) -> None:
        if entry.layer is None:
            self.unit_entry = str(entry)
        self.meter.mark(str(entry))

    def layer_ended(self, module, args, output) -> None:
        if self.runtime.offloader._capturing is not None and torch.is_grad_enabled():
            self.meter.mark(f"after:{self.meter._segment[0]}")

    def step_ended(self) -> None:
        self.meter.mark(f"after:{self.unit_entry}")

    def __enter__(self):
        # Registered before the runtime re-attaches its own hooks at the schedule call, so
        # this layer-end mark comes before the runtime's offload at the same point.
        self.handles = [layer.register_forward_hook(self.layer_ended) for layer in self.layers]
        self.runtime.offloader.entry_listener = self.entry
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.runtime.offloader.entry_listener = None


def _bound_hooks(meter: TruePeakMeter, static_keys: set[int]):
    def pack(t: torch.Tensor):
        if _storage_key(t.untyped_storage()) in static_keys:
            return ("static", t.detach())
        with meter.untracked():
            host = t.detach().clone()
        meter.add_host(host)
        return ("host", host)

    def unpack(held):
        kind, t = held
        return t if kind == "static" else t.clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _host_pool_counted(meter: TruePeakMeter):
    from megatron_offload.runtime import host_pool

    orig = host_pool.HostBufferPool._allocate

    def _allocate(self, *a, **k):
        with meter.untracked():
            buffer = orig(self, *a, **k)
        meter.add_host(buffer)
        return buffer

    host_pool.HostBufferPool._allocate = _allocate
    return lambda: setattr(host_pool.HostBufferPool, "_allocate", orig)


@contextlib.contextmanager
def _fgao(meter: TruePeakMeter):
    from megatron_offload.testing.fgao_cpu import fgao_stand_ins

    with fgao_stand_ins() as fgao:
        fgao.PipelineOffloadManager.reset_instance()
        handler = fgao.ChunkOffloadHandler
        orig_offload = handler.offload

        def offload(self, *a, **k):
            with meter.untracked():
                state = orig_offload(self, *a, **k)
            meter.add_host(state[1])
            return state

        handler.offload = offload
        try:
            yield
        finally:
            handler.offload = orig_offload
            fgao.PipelineOffloadManager.OFFLOAD_MGR = None


def _build(case, variant, meter):
    if variant != "fgao":
        return build_model(case)
    from megatron.core.transformer import transformer_config as tc_mod

    from megatron_offload.testing.fgao_cpu import DENSE_MODULES

    real = tc_mod.TransformerConfig

    def config(**kw):
        return real(**kw, fine_grained_activation_offloading=True,
                    offload_modules=list(DENSE_MODULES), min_offloaded_tensor_size=0)

    tc_mod.TransformerConfig = config
    try:
        return build_model(case)
    finally:
        tc_mod.TransformerConfig = real


def measure(case: TinyGPTCase | dict, variant: str, iterations: int = 4,
            measure_iteration: int = 2) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} not in {VARIANTS}")
    if isinstance(case, dict):
        case = TinyGPTCase(**case)
    ensure_cpu_shims()
    init_parallel_state(case)
    meter = TruePeakMeter()
    restore = []
    runtime = None
    try:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        outer = contextlib.ExitStack()
        restore.append(outer.close)
        if variant == "fgao":
            outer.enter_context(_fgao(meter))
        chunks = _build(case, variant, meter)
        static = _static_tensors(chunks)
        meter.exclude(static)
        static_keys = {_storage_key(t.untyped_storage()) for t in static}
        if variant in ("plugin", "layers", "profile"):
            from megatron_offload.config import OffloadConfig
            from megatron_offload.integration.megatron_core import install, uninstall

            restore.append(_host_pool_counted(meter))
            runtime = install(OffloadConfig(
                policy="none" if variant == "profile" else "full", min_offload_bytes=0,
                backend="cpu", granularity="unit" if variant == "plugin" else "layer"))
            restore.append(uninstall)
        records, times = [], []
        for it in range(iterations):
            measured = it == measure_iteration
            hooks = (_bound_hooks(meter, static_keys) if variant == "bound"
                     else contextlib.nullcontext())
            fb = get_forward_backward_func()
            t0 = time.perf_counter()
            with contextlib.ExitStack() as stack:
                stack.enter_context(hooks)
                marks = _EntryMarks(meter, runtime, chunks) if (
                    measured and variant == "profile") else None
                if measured:
                    stack.enter_context(_step_boundaries(meter, marks))
                    stack.enter_context(meter)
                    meter.start()
                    if marks is not None:
                        stack.enter_context(marks)
                store = _one_iteration(case, chunks, fb, it, dp_rank, pp_rank, None)
                if measured:
                    meter.mark(None)
                    meter.stop()
            dt = time.perf_counter() - t0
            if it > 0 and not measured:
                times.append(dt)
            rec = {"loss_bytes": None, "grads": _collect_grads(chunks, case),
                   "seq_length": case.seq_length_at(it)}
            if is_last:
                rec["loss_bytes"] = torch.stack([d["lm loss"] for d in store]).numpy().tobytes()
            records.append(rec)
            _sgd_step(chunks, case.lr)
        stats = None
        host_pool = []
        if runtime is not None and runtime.iteration_stats:
            stats = runtime.iteration_stats[measure_iteration].as_dict()
            stats.pop("samples", None)
            host_pool = [s.host_pool_bytes for s in runtime.iteration_stats]
        return {
            "rank": dist.get_rank(), "pp_rank": pp_rank, "dp_rank": dp_rank,
            "variant": variant, "iterations": records,
            "true_peak_bytes": meter.peak_bytes,
            "boundary_peak_bytes": meter.boundary_peak_bytes,
            "host_peak_bytes": meter.host_peak_bytes,
            "ops": meter.ops, "boundary_samples": meter.samples,
            "iteration_s": sum(times) / max(len(times), 1),
            "offload_stats": stats,
            "host_pool_bytes": host_pool,
            "segments": meter.segments,
        }
    except BaseException:
        release_parallel_state()
        raise
    finally:
        for fn in reversed(restore):
            fn()


__all__ = ["measure", "VARIANTS"]
