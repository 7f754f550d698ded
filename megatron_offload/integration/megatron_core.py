"""Patches that put the offload runtime under Megatron-Core's own pipeline schedules.

Supported: the megatron-core releases of :data:`megatron_offload.releases.RELEASES`
(``releases.SUPPORTED_TEXT``), checked once at :func:`install`; any other release is refused
with an error naming that range. What differs between the supported releases is that table
(one :class:`~megatron_offload.releases.Release` per minor version, each fact read from that
release's wheel), and every call into Megatron binds its arguments by name
(``releases.call_by_name``).

Patch set ``megatron-core schedules`` (:func:`schedule_patches`, in the
:class:`~.patching.PatchSet` registry), installed by :func:`install`:

- ``megatron.core.pipeline_parallel.schedules.forward_step``: runs each (chunk, microbatch)
  forward under the runtime's saved-tensor hooks, then starts the unit's offload;
- ``megatron.core.pipeline_parallel.schedules.backward_step``: reloads (if not yet
  prefetched) and runs the unit's backward;
- ``megatron.core.pipeline_parallel.schedules.forward_backward_no_pipelining``,
  ``megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_without_interleaving``,
  ``megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_with_interleaving``:
  predict this rank's op order from Megatron's own ``get_pp_rank_microbatches`` /
  ``get_schedule_table`` (:mod:`.megatron_schedules`), choose the units to offload
  (``planning/policy.py``), refuse unsupported modes (:mod:`.refusals`) before the first
  step, and leave no state behind if a step raises. With ``OffloadConfig(schedule="gis")``
  the two pipelined functions run the plugin's executor instead (:mod:`.gis_schedule`).

The three schedule functions are looked up by ``get_forward_backward_func`` in the module
globals at call time (0.19's ``schedule_pg_collection`` argument only chooses among them), so
every caller of the getter is reached, including Megatron-LM's ``training.py`` which binds the
getter itself at import and, from 0.17 on, fetches the schedule function once before its loop
(so install before ``pretrain()``/``train()`` starts). ``forward_step``/``backward_step`` are
module globals the schedules call by name; from 0.17 on the non-interleaved schedule binds
``backward_func = backward_step`` when it starts, which reads the patched global too.
Forward-only passes (evaluation, inference) run the original code untouched. :func:`uninstall`
restores every original object (the patch set's restore), removes the layer hooks and
closes the offloader.
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.integration.gis_schedule import gis_schedule_function
from megatron_offload.integration.megatron_schedules import (
    NO_PIPELINING,
    PIPELINED,
    SCHEDULE_FUNCTIONS,
    RankOrder,
    model_chunks,
    pipeline_group,
    predict_rank_order,
    schedules_module,
)
from megatron_offload.integration.offload_runtime import (
    OffloadRuntime,
    offloader_for,
    runtime_plan_for,
)
from megatron_offload.integration.patching import Patch, PatchSet
from megatron_offload.integration.refusals import refuse_unsupported
from megatron_offload.planning.policy import units_to_offload
from megatron_offload.releases import SUPPORTED_TEXT, release
from megatron_offload.runtime.offloader import iteration

_SCHEDULE_FUNCTIONS = SCHEDULE_FUNCTIONS  # the name the tests use
_MARKER = "_megatron_offload_patch"
PATCH_SET = "megatron-core schedules"

_runtime: OffloadRuntime | None = None


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
    runtime = OffloadRuntime(config=config, release=facts,
                             patches=PatchSet(PATCH_SET, marker=_MARKER, log_level=logging.INFO))
    runtime.patches.install(schedule_patches(runtime))
    _runtime = runtime
    return runtime


def schedule_patches(runtime: OffloadRuntime) -> list[Patch]:
    """The patch set's rows: the two steps, then the three schedule functions (the pipelined
    ones run the executor with ``--offload-schedule gis``)."""
    schedules = schedules_module()
    patches = [
        Patch.function(
            schedules, "forward_step", functools.partial(_patched_forward_step, runtime)
        ),
        Patch.function(
            schedules, "backward_step", functools.partial(_patched_backward_step, runtime)
        ),
    ]
    for name in SCHEDULE_FUNCTIONS:
        gis = runtime.config.schedule == "gis" and name in PIPELINED
        make = gis_schedule_function if gis else _patched_schedule
        patches.append(Patch.function(schedules, name, functools.partial(make, runtime, name)))
    return patches


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
    _runtime.patches.restore()
    if _runtime.layer_hooks is not None:
        _runtime.layer_hooks.remove()
    if _runtime.offloader is not None:
        _runtime.offloader.close()  # returns the host pool's (pinned) memory
    _runtime = None


# --------------------------------------------------------------------------- the patches
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

    return forward_step


def _patched_backward_step(runtime: OffloadRuntime, original):
    signature = inspect.signature(original)

    def backward_step(*args, **kwargs):
        if not runtime.active:
            return original(*args, **kwargs)
        output_tensor = signature.bind(*args, **kwargs).arguments["output_tensor"]
        key = runtime.offloader.unit_for_output(output_tensor)
        return runtime.offloader.run_backward(key, lambda: original(*args, **kwargs))

    return backward_step


def _patched_schedule(runtime: OffloadRuntime, name: str, original):
    def schedule(*args, **kwargs):
        if kwargs.get("forward_only", False) or runtime.active:
            runtime.passthrough += 1
            try:
                return original(*args, **kwargs)
            finally:
                runtime.passthrough -= 1
        chunks = model_chunks(kwargs.get("model"))
        from megatron.core.utils import get_model_config

        config = get_model_config(chunks[0])
        refuse_unsupported(config, runtime.release, schedule_kwargs=kwargs)
        runtime.config.check_against_model(len(chunks))
        order = predict_rank_order(name, kwargs, config, len(chunks))
        offload = choose_offload_set(runtime, name, kwargs, config, chunks, order)
        offloader = offloader_for(runtime, chunks, order.rank)
        plan = runtime_plan_for(runtime, offloader, chunks, config, order, offload)
        runtime.active = True
        try:
            with iteration(offloader, order.ops, offload, plan=plan):
                return original(*args, **kwargs)
        finally:
            runtime.active = False

    return schedule


# ------------------------------------------------------- the hook where the offload set is chosen
def choose_offload_set(runtime: OffloadRuntime, name: str, kwargs, config, chunks,
                       order: RankOrder):
    """This rank's (chunk, microbatch) units to offload in this call: the policy's rule
    (``policy.units_to_offload``), or for ``--offload-policy auto`` the planner's choice for
    this job and budget (``integration.auto``, decided at the first call of each schedule
    shape; raises before the first step when the budget cannot be met)."""
    if runtime.config.policy != "auto":
        return units_to_offload(order.ops, runtime.config)
    from megatron_offload.integration.auto import auto_offload_units

    group = None if name == NO_PIPELINING else pipeline_group(kwargs)
    return set(auto_offload_units(runtime, name, kwargs, config, chunks, order, group))


__all__ = [
    "install", "uninstall", "OffloadRuntime", "refuse_unsupported", "predict_rank_order",
    "RankOrder", "choose_offload_set", "schedule_patches",
]
