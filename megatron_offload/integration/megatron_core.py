"""Patches that put the offload runtime under Megatron-Core's own pipeline schedules.

Supported: megatron-core >= 0.16.0, < 0.17 (checked at :func:`install`).

:func:`install` replaces, in ``megatron.core.pipeline_parallel.schedules``:

- ``forward_step``: runs each (chunk, microbatch) forward under the runtime's saved-tensor
  hooks, then starts the unit's offload;
- ``backward_step``: reloads (if not yet prefetched) and runs the unit's backward;
- ``forward_backward_no_pipelining``, ``forward_backward_pipelining_without_interleaving``,
  ``forward_backward_pipelining_with_interleaving``: predict this rank's op order from
  Megatron's own ``get_pp_rank_microbatches`` / ``get_schedule_table``, choose the units to
  offload (``policy.py``), refuse unsupported modes, and leave no state behind if a step raises.

The three schedule functions are looked up by ``get_forward_backward_func`` in the module
globals at call time, so every caller of the getter is reached, including Megatron-LM's
``training.py`` which binds the getter itself at import. ``forward_step``/``backward_step`` are
module globals the schedules call by name. Forward-only passes (evaluation, inference) run the
original code untouched. :func:`uninstall` restores every original object.
"""
from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.policy import units_to_offload
from megatron_offload.runtime.accounting import IterationStats
from megatron_offload.runtime.offloader import ActivationOffloader, iteration
from megatron_offload.runtime.transfer import make_backend
from megatron_offload.schedule.ir import Op, OpKind

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ((0, 16), (0, 17), (0, 18), (0, 19))
SUPPORTED_TEXT = "megatron-core 0.16.x"
_SCHEDULES = "megatron.core.pipeline_parallel.schedules"
_SCHEDULE_FUNCTIONS = (
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
)
_MARKER = "_megatron_offload_patch"


@dataclass(slots=True, eq=False)
class OffloadRuntime:
    """What :func:`install` returns: the config and this process's offloader."""

    config: OffloadConfig
    offloader: ActivationOffloader | None = None
    active: bool = False
    passthrough: int = 0
    """Forward-only passes in progress: their forward_step calls run unpatched."""
    originals: dict = field(default_factory=dict)

    @property
    def iteration_stats(self) -> Sequence[IterationStats]:
        """The most recent iterations' stats (``runtime.offloader.STATS_HISTORY`` at most)."""
        return () if self.offloader is None else self.offloader.iteration_stats


_runtime: OffloadRuntime | None = None


def _schedules_module():
    try:
        from megatron.core.pipeline_parallel import schedules
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            f"--pipeline-offload needs megatron-core ({SUPPORTED_TEXT}); could not import "
            f"{_SCHEDULES}: {error}. Install it with: pip install 'megatron-core>=0.16,<0.17'"
        ) from error
    return schedules


def check_megatron_version(version: str | None = None) -> str:
    """Raise ValueError unless the installed (or given) megatron-core version is supported."""
    if version is None:
        from megatron.core import package_info

        version = package_info.__version__
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"megatron-core {version} is not supported by --pipeline-offload (supported: "
            f"{SUPPORTED_TEXT}); install megatron-core==0.16.1, or run without "
            "--pipeline-offload"
        )
    return version


def install(config: OffloadConfig) -> OffloadRuntime:
    """Patch megatron-core's schedules so each training iteration offloads per ``config``.

    Idempotent: installing again replaces the configuration. Call before the first
    ``forward_backward_func(...)``; the patched functions are those listed in this module's
    docstring.
    """
    global _runtime
    if not isinstance(config, OffloadConfig):
        raise TypeError(f"install() takes an OffloadConfig, not {type(config).__name__}")
    check_megatron_version()
    if _runtime is not None:
        uninstall()
    schedules = _schedules_module()
    runtime = OffloadRuntime(config=config)
    for name in ("forward_step", "backward_step", *_SCHEDULE_FUNCTIONS):
        original = getattr(schedules, name)
        if getattr(original, _MARKER, False):  # pragma: no cover - defensive
            original = original.__wrapped__
        runtime.originals[name] = original
    patched = {
        "forward_step": _patched_forward_step(runtime, runtime.originals["forward_step"]),
        "backward_step": _patched_backward_step(runtime, runtime.originals["backward_step"]),
    }
    for name in _SCHEDULE_FUNCTIONS:
        patched[name] = _patched_schedule(runtime, name, runtime.originals[name])
    for name, fn in patched.items():
        setattr(schedules, name, fn)
        log.info("megatron-offload: patched %s.%s", _SCHEDULES, name)
    _runtime = runtime
    return runtime


def uninstall() -> None:
    """Restore every patched Megatron function. Safe to call when not installed."""
    global _runtime
    if _runtime is None:
        return
    if _runtime.active:
        raise RuntimeError(
            "megatron-offload: uninstall() was called while a training iteration is running "
            "(from inside forward_step_func or a hook?); the remaining steps would skip their "
            "reloads. Call uninstall() between iterations."
        )
    schedules = _schedules_module()
    for name, original in _runtime.originals.items():
        setattr(schedules, name, original)
    if _runtime.offloader is not None:
        _runtime.offloader.close()  # returns the host pool's (pinned) memory
    _runtime = None


# --------------------------------------------------------------------------- the patches
def _mark(wrapper, original):
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARKER, True)
    return wrapper


def _patched_forward_step(runtime: OffloadRuntime, original):
    signature = inspect.signature(original)

    def forward_step(*args, **kwargs):
        if not runtime.active:
            if not runtime.passthrough and torch.is_grad_enabled():
                raise RuntimeError(
                    "megatron-offload: a training forward_step ran outside the patched "
                    "schedules: its schedule function was fetched (get_forward_backward_func()) "
                    "before install(), so nothing would be offloaded. Call install() first "
                    "(with Megatron-LM: before pretrain(), as megatron_offload.launch does)."
                )
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        microbatch = bound.arguments.get("current_microbatch")
        if microbatch is None:
            raise RuntimeError(
                "megatron-offload: forward_step was called without current_microbatch; this "
                f"schedule is not one {SUPPORTED_TEXT} runs"
            )
        chunk = bound.arguments.get("vp_stage") or 0
        inputs = bound.arguments.get("input_tensor")
        inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        return runtime.offloader.run_forward(
            (chunk, microbatch), inputs, lambda: original(*args, **kwargs)
        )

    return _mark(forward_step, original)


def _patched_backward_step(runtime: OffloadRuntime, original):
    signature = inspect.signature(original)

    def backward_step(*args, **kwargs):
        if not runtime.active:
            return original(*args, **kwargs)
        output_tensor = signature.bind(*args, **kwargs).arguments["output_tensor"]
        key = runtime.offloader.unit_for_output(output_tensor)
        return runtime.offloader.run_backward(key, lambda: original(*args, **kwargs))

    return _mark(backward_step, original)


def _patched_schedule(runtime: OffloadRuntime, name: str, original):
    def schedule(*args, **kwargs):
        if kwargs.get("forward_only", False) or runtime.active:
            runtime.passthrough += 1
            try:
                return original(*args, **kwargs)
            finally:
                runtime.passthrough -= 1
        model = kwargs.get("model")
        chunks = model if isinstance(model, list) else [model]
        from megatron.core.utils import get_model_config

        config = get_model_config(chunks[0])
        refuse_unsupported(config)
        runtime.config.check_against_model(len(chunks))
        order = predict_rank_order(name, kwargs, config, len(chunks))
        offloader = _offloader_for(runtime, chunks, order.rank)
        runtime.active = True
        try:
            with iteration(offloader, order.ops, units_to_offload(order.ops, runtime.config)):
                return original(*args, **kwargs)
        finally:
            runtime.active = False

    return _mark(schedule, original)


def _offloader_for(runtime: OffloadRuntime, chunks, rank: int) -> ActivationOffloader:
    if runtime.offloader is None:
        param = next(chunks[0].parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        backend = make_backend(runtime.config.backend, device)
        runtime.offloader = ActivationOffloader(
            runtime.config, backend, device_type=device.type, rank_label=f"[pp rank {rank}] "
        )
    # Every call: a model rebuilt between iterations brings new parameter storages.
    runtime.offloader.register_model(chunks)
    return runtime.offloader


def refuse_unsupported(config) -> None:
    """Modes whose steps bypass forward_step/backward_step or fight over saved tensors."""
    problems = []
    if getattr(config, "overlap_moe_expert_parallel_comm", False):
        problems.append(
            "--overlap-moe-expert-parallel-comm (MoE A2A-overlap combined 1F1B runs its own "
            "forward/backward and is not offloadable): drop the flag"
        )
    if getattr(config, "enable_cuda_graph", False) or getattr(config, "external_cuda_graph", False) or (
        getattr(config, "cuda_graph_impl", "none") not in (None, "none")
    ):
        problems.append(
            "CUDA graphs (--cuda-graph-impl / --enable-cuda-graph / --external-cuda-graph): a "
            "captured graph cannot release and refill activation memory; drop the flag"
        )
    if getattr(config, "cpu_offloading", False):
        problems.append(
            "--cpu-offloading (Megatron's layer-wise offload): only one offloading mechanism "
            "can own the saved-tensor hooks; drop --cpu-offloading"
        )
    if getattr(config, "fine_grained_activation_offloading", False):
        problems.append(
            "--fine-grained-activation-offloading: only one offloading mechanism can own the "
            "saved-tensor hooks; drop --fine-grained-activation-offloading"
        )
    if problems:
        raise ValueError(
            "--pipeline-offload cannot run with: " + "; ".join(problems)
        )


# ------------------------------------------------------------------------ order prediction
@dataclass(slots=True)
class RankOrder:
    rank: int
    ops: list[Op]


def _pipeline_group(kwargs):
    communicator = kwargs.get("p2p_communicator")
    if communicator is not None:
        return communicator.pp_group
    collection = kwargs.get("pg_collection")
    if collection is not None and getattr(collection, "pp", None) is not None:
        return collection.pp
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def predict_rank_order(name: str, kwargs, config, num_chunks: int) -> RankOrder:
    """This rank's (F/B, chunk, microbatch) order, from Megatron's own helpers."""
    schedules = _schedules_module()
    m = kwargs["num_microbatches"]
    if name == "forward_backward_no_pipelining":
        ops = [op for mb in range(m) for op in (Op(OpKind.FORWARD, 0, mb), Op(OpKind.BACKWARD, 0, mb))]
        return RankOrder(rank=0, ops=ops)
    group = _pipeline_group(kwargs)
    p, r = group.size(), group.rank()
    interleaved = name == "forward_backward_pipelining_with_interleaving"
    v = num_chunks if interleaved else 1
    g = (config.microbatch_group_size_per_vp_stage or p) if interleaved else m
    communicator = types.SimpleNamespace(
        pp_group=group, virtual_pipeline_model_parallel_size=v if interleaved else None
    )
    total, _, warmup, remaining = schedules.get_pp_rank_microbatches(
        m,
        v,
        g,
        forward_only=False,
        overlap_moe_expert_parallel_comm=False,
        p2p_communicator=communicator,
    )
    table = schedules.get_schedule_table(m, v, g) if interleaved else [(mb, 0) for mb in range(m)]

    def forward(k: int) -> Op:
        microbatch, chunk = table[k]
        return Op(OpKind.FORWARD, chunk, microbatch)

    def backward(k: int) -> Op:
        # Backward k runs the chunks in reverse (v - 1 - table chunk), FIFO per chunk.
        microbatch, chunk = table[k]
        return Op(OpKind.BACKWARD, v - 1 - chunk, microbatch)

    ops = [forward(k) for k in range(warmup)]
    for k in range(remaining):
        ops += [forward(warmup + k), backward(k)]
    ops += [backward(k) for k in range(remaining, total)]
    return RankOrder(rank=r, ops=ops)
