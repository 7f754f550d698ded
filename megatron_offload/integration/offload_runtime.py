"""One installed offload runtime (:class:`OffloadRuntime`) and what both schedule paths build
from it on a training call: this rank's offloader, with the transfer backend and the host
pool the integration chose for it (:func:`offloader_for`), and the runtime list the
offloader follows, with the transformer layers hooked at layer granularity
(:func:`runtime_plan_for`). Used by :mod:`.megatron_core` (which creates the runtime at
``install()``) and :mod:`.gis_schedule`; it patches nothing itself.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.integration.layers import LayerHooks, attach_layer_hooks
from megatron_offload.integration.megatron_schedules import RankOrder, schedules_module
from megatron_offload.integration.patching import PatchSet
from megatron_offload.planning.policy import runtime_plan
from megatron_offload.releases import Release
from megatron_offload.runtime.accounting import IterationStats
from megatron_offload.runtime.host_pool import HostBufferPool
from megatron_offload.runtime.offloader import ActivationOffloader
from megatron_offload.runtime.transfer import make_backend


@dataclass(slots=True, eq=False)
class OffloadRuntime:
    """What :func:`megatron_core.install` returns: the config and this process's offloader."""

    config: OffloadConfig
    release: Release
    """The installed megatron-core's facts (checked once, at install)."""
    patches: PatchSet
    """The schedule patches in place (``megatron_core.schedule_patches``)."""
    offloader: ActivationOffloader | None = None
    active: bool = False
    passthrough: int = 0
    """Forward-only passes in progress: their forward_step calls run unpatched."""
    auto: dict = field(default_factory=dict)
    """Policy auto: the planner's decision per schedule shape (``integration.auto``)."""
    layer_hooks: LayerHooks | None = None
    """--offload-granularity layer: the hooks on the model's transformer layers."""

    @property
    def iteration_stats(self) -> Sequence[IterationStats]:
        """The most recent iterations' stats (``runtime.offloader.STATS_HISTORY`` at most)."""
        return () if self.offloader is None else self.offloader.iteration_stats

    def original(self, name: str):
        """Megatron's own ``schedules.<name>``, behind the patch."""
        return self.patches.original(schedules_module(), name)


def compute_device(chunks) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    param = next(chunks[0].parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def offloader_for(runtime: OffloadRuntime, chunks, rank: int) -> ActivationOffloader:
    """This rank's offloader, created at the first training call: the transfer backend
    ``--offload-backend`` names (``auto``: by the parameters' device) and a host pool for
    that backend within ``--offload-host-budget-gib``. Every call registers the model (a
    model rebuilt between iterations brings new parameter storages)."""
    if runtime.offloader is None:
        device = compute_device(chunks)
        backend = make_backend(runtime.config.backend, device)
        pool = HostBufferPool.for_offload(pin=backend.pin_memory,
                                          budget_bytes=runtime.config.host_budget_bytes)
        runtime.offloader = ActivationOffloader(
            runtime.config, backend, device_type=device.type, rank_label=f"[pp rank {rank}] ",
            pool=pool,
        )
    runtime.offloader.register_model(chunks)
    return runtime.offloader


def runtime_plan_for(runtime: OffloadRuntime, offloader: ActivationOffloader, chunks,
                     model_config, order: RankOrder, offload) -> list:
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
