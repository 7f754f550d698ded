"""Patches that put the offload runtime under Megatron-Core's own pipeline schedules.

Supported: megatron-core 0.16.x, 0.17.x, 0.18.x and 0.19.x (``>=0.16,<0.20``), checked once
at :func:`install`; any other release is refused with an error naming that range. This is the
one module that knows Megatron's internals: what differs between the supported releases is
the table :data:`RELEASES` (one :class:`Release` per minor version, each fact read from that
release's wheel), and every call into Megatron binds its arguments by name.

:func:`install` replaces, in ``megatron.core.pipeline_parallel.schedules``:

- ``forward_step``: runs each (chunk, microbatch) forward under the runtime's saved-tensor
  hooks, then starts the unit's offload;
- ``backward_step``: reloads (if not yet prefetched) and runs the unit's backward;
- ``forward_backward_no_pipelining``, ``forward_backward_pipelining_without_interleaving``,
  ``forward_backward_pipelining_with_interleaving``: predict this rank's op order from
  Megatron's own ``get_pp_rank_microbatches`` / ``get_schedule_table``, choose the units to
  offload (``policy.py``), refuse unsupported modes (:func:`refuse_unsupported`) before the
  first step, and leave no state behind if a step raises.

The three schedule functions are looked up by ``get_forward_backward_func`` in the module
globals at call time (0.19's ``schedule_pg_collection`` argument only chooses among them), so
every caller of the getter is reached, including Megatron-LM's ``training.py`` which binds the
getter itself at import and, from 0.17 on, fetches the schedule function once before its loop
(so install before ``pretrain()``/``train()`` starts). ``forward_step``/``backward_step`` are
module globals the schedules call by name; from 0.17 on the non-interleaved schedule binds
``backward_func = backward_step`` when it starts, which reads the patched global too.
Forward-only passes (evaluation, inference) run the original code untouched. :func:`uninstall`
restores every original object. With ``OffloadConfig(schedule="gis")`` the two pipelined
functions run the plugin's executor instead (``integration/gis_schedule.py``).
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
from megatron_offload.integration.layers import LayerHooks, attach_layer_hooks
from megatron_offload.planning.policy import runtime_plan, units_to_offload
from megatron_offload.runtime.accounting import IterationStats
from megatron_offload.runtime.offloader import ActivationOffloader, iteration
from megatron_offload.runtime.transfer import make_backend
from megatron_offload.releases import (
    SUPPORTED_RANGE, SUPPORTED_TEXT, Release, call_by_name, release,
)
from megatron_offload.schedule.ir import Op, OpKind

log = logging.getLogger(__name__)

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
    release: Release
    """The installed megatron-core's facts (checked once, at :func:`install`)."""
    offloader: ActivationOffloader | None = None
    active: bool = False
    passthrough: int = 0
    """Forward-only passes in progress: their forward_step calls run unpatched."""
    originals: dict = field(default_factory=dict)
    auto: dict = field(default_factory=dict)
    """Policy auto: the planner's decision per schedule shape (``integration.auto``)."""
    layer_hooks: LayerHooks | None = None
    """--offload-granularity layer: the hooks on the model's transformer layers."""

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
            f"{_SCHEDULES}: {error}. Install it with: pip install 'megatron-core{SUPPORTED_RANGE}'"
        ) from error
    return schedules


def install(config: OffloadConfig) -> OffloadRuntime:
    """Patch megatron-core's schedules so each training iteration offloads per ``config``.

    Idempotent: installing again replaces the configuration. Call before the first
    ``forward_backward_func(...)``; the patched functions are those listed in this module's
    docstring.
    """
    global _runtime
    if not isinstance(config, OffloadConfig):
        raise TypeError(f"install() takes an OffloadConfig, not {type(config).__name__}")
    facts = release()  # the one version check: unsupported releases stop here
    if _runtime is not None:
        uninstall()
    schedules = _schedules_module()
    runtime = OffloadRuntime(config=config, release=facts)
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
    if config.schedule == "gis":  # the pipelined functions run the executor instead
        from megatron_offload.integration.gis_schedule import patch_gis

        patched.update(patch_gis(runtime))
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
    if _runtime.layer_hooks is not None:
        _runtime.layer_hooks.remove()
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
        refuse_unsupported(config, runtime.release, schedule_kwargs=kwargs)
        runtime.config.check_against_model(len(chunks))
        order = predict_rank_order(name, kwargs, config, len(chunks))
        offload = choose_offload_set(runtime, name, kwargs, config, chunks, order)
        offloader = _offloader_for(runtime, chunks, order.rank)
        plan = _runtime_plan(runtime, offloader, chunks, config, order, offload)
        runtime.active = True
        try:
            with iteration(offloader, order.ops, offload, plan=plan):
                return original(*args, **kwargs)
        finally:
            runtime.active = False

    return _mark(schedule, original)


# ------------------------------------------------------- the hook where the offload set is chosen
def choose_offload_set(runtime: OffloadRuntime, name: str, kwargs, config, chunks, order: "RankOrder"):
    """This rank's (chunk, microbatch) units to offload in this call: the policy's rule
    (``policy.units_to_offload``), or for ``--offload-policy auto`` the planner's choice for
    this job and budget (``integration.auto``, decided at the first call of each schedule
    shape; raises before the first step when the budget cannot be met)."""
    if runtime.config.policy != "auto":
        return units_to_offload(order.ops, runtime.config)
    from megatron_offload.integration.auto import auto_offload_units

    group = None if name == "forward_backward_no_pipelining" else _pipeline_group(kwargs)
    return set(auto_offload_units(runtime, name, kwargs, config, chunks, order, group))


def _runtime_plan(runtime: OffloadRuntime, offloader, chunks, model_config, order, offload):
    """The entries the runtime follows this call; at layer granularity the transformer
    layers are hooked first (every call: the model may have been rebuilt)."""
    layers = 0
    if runtime.config.granularity == "layer":
        if runtime.layer_hooks is not None:
            runtime.layer_hooks.remove()
        runtime.layer_hooks = attach_layer_hooks(offloader, chunks, model_config)
        layers = runtime.layer_hooks.layers_per_chunk
    return runtime_plan(order.ops, offload, runtime.config, layers,
                        synchronous_copies=not offloader.backend.asynchronous)


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


def refuse_unsupported(config, facts: Release | None = None, *, schedule_kwargs=None) -> None:
    """Raise ValueError, naming each flag and its fix, for every mode whose steps bypass
    ``forward_step``/``backward_step``, run them in an order the plugin does not predict, or
    whose own code owns the saved-tensor hooks.

    ``config`` is the model's ``TransformerConfig`` (read with ``getattr``: fields that a
    release lacks count as off); ``facts`` the release (default: the installed one);
    ``schedule_kwargs`` the keyword arguments the schedule function was called with (for the
    multi-module pipelines of 0.17+). The patched schedules call this before their first step.
    """
    facts = release() if facts is None else facts
    problems = []

    def on(name: str) -> bool:
        value = getattr(config, name, None)
        return value is not None and value is not False

    if on("overlap_moe_expert_parallel_comm"):
        problems.append(
            "--overlap-moe-expert-parallel-comm (MoE A2A-overlap combined 1F1B runs its own "
            "forward/backward and is not offloadable): drop the flag"
        )
    if on("hybrid_context_parallel"):
        problems.append(
            "--hybrid-context-parallel (its schedule runs forward_step/backward_step per packed "
            "sub-sample group, in an order and count the plugin does not predict): drop the flag"
        )
    graph_impl = getattr(config, "cuda_graph_impl", "none")
    scope = getattr(config, "cuda_graph_scope", None)
    scopes = scope if isinstance(scope, (list, tuple)) else [scope]
    full_iteration = graph_impl == "full_iteration" or (
        facts.full_iteration_graph_field == "cuda_graph_scope"
        and graph_impl == "local"
        and any(getattr(s, "name", s) == "full_iteration" for s in scopes)
    )
    if full_iteration:
        where = ("--cuda-graph-impl full_iteration"
                 if facts.full_iteration_graph_field == "cuda_graph_impl"
                 else "--cuda-graph-scope full_iteration")
        problems.append(
            f"{where} (a whole-iteration CUDA graph replays the schedule without running "
            "forward_step/backward_step, and a captured graph cannot release and refill "
            "activation memory): drop the flag (--cuda-graph-impl none)"
        )
    elif on("enable_cuda_graph") or on("external_cuda_graph") or graph_impl not in (None, "none"):
        problems.append(
            "CUDA graphs (--cuda-graph-impl / --enable-cuda-graph / --external-cuda-graph): a "
            "captured graph cannot release and refill activation memory; drop the flag"
        )
    if on("cpu_offloading"):
        problems.append(
            "--cpu-offloading (Megatron's layer-wise offload): only one offloading mechanism "
            "can own the saved-tensor hooks; drop --cpu-offloading"
        )
    if on("fine_grained_activation_offloading"):
        problems.append(
            "--fine-grained-activation-offloading: only one offloading mechanism can own the "
            "saved-tensor hooks; drop --fine-grained-activation-offloading"
        )
    if on("moe_paged_stash"):
        problems.append(
            "--moe-paged-stash (Megatron's MoE paged stash installs its own saved-tensor hooks "
            "for the expert activations; only one mechanism can own them): drop --moe-paged-stash"
        )
    if on("moe_expert_rank_capacity_factor"):
        problems.append(
            "--moe-expert-rank-capacity-factor (Megatron-LM then wraps the schedule in "
            "PagedStashRunner, which reads every microbatch ahead and reruns the whole "
            "forward-backward after a token overflow, outside the order the plugin predicts): "
            "drop the flag"
        )
    if schedule_kwargs:
        multimodule = _multimodule_argument(schedule_kwargs, facts)
        if multimodule:
            problems.append(
                f"a multi-module pipeline ({multimodule} passed to the schedule, e.g. a MIMO "
                "model with separate encoder and language-model grids: its backward runs "
                "backward_step_multimodule, which the plugin does not patch): run it without "
                "--pipeline-offload"
            )
    if problems:
        raise ValueError("--pipeline-offload cannot run with: " + "; ".join(problems))


def _multimodule_argument(kwargs, facts: Release) -> str | None:
    """The name of the schedule argument that makes it a multi-module pipeline, or None."""
    communicator = kwargs.get("p2p_communicator")
    collection = kwargs.get("pg_collection")
    if facts.multimodule_pipelines:
        from megatron.core.pipeline_parallel.multimodule_communicator import (
            MultiModulePipelineCommunicator,
        )
        from megatron.core.process_groups_config import MultiModuleProcessGroupCollection

        if isinstance(collection, MultiModuleProcessGroupCollection):
            return "pg_collection=MultiModuleProcessGroupCollection"
        if isinstance(communicator, MultiModulePipelineCommunicator):
            return "p2p_communicator=MultiModulePipelineCommunicator"
    if communicator is not None and not hasattr(communicator, "pp_group"):
        return f"p2p_communicator={type(communicator).__name__} without a pp_group"
    return None


# ------------------------------------------------------------------------ order prediction
@dataclass(slots=True)
class RankOrder:
    rank: int
    ops: list[Op]


def _pipeline_group(kwargs):
    """The pipeline group the schedule itself uses: every supported release takes
    ``p2p_communicator.pp_group`` when a communicator is passed (together with
    ``pg_collection``) and builds one on ``parallel_state``'s pipeline group otherwise."""
    communicator = kwargs.get("p2p_communicator")
    if communicator is not None:
        return communicator.pp_group  # a communicator without one was refused before
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
    total, _, warmup, remaining = call_by_name(
        schedules.get_pp_rank_microbatches,
        num_microbatches=m,
        num_model_chunks=v,
        microbatch_group_size_per_vp_stage=g,
        forward_only=False,
        overlap_moe_expert_parallel_comm=False,
        p2p_communicator=communicator,
    )
    table = (
        call_by_name(schedules.get_schedule_table, num_microbatches=m, num_model_chunks=v,
                     microbatch_group_size_per_vp_stage=g)
        if interleaved else [(mb, 0) for mb in range(m)]
    )

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
