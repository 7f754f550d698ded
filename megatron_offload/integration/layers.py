"""Transformer-layer boundaries for layer streaming (``--offload-granularity layer``).

Each of a model chunk's transformer layers (megatron-core's ``TransformerLayer``, the local
and the Transformer Engine spec alike) gets a forward pre-hook and a forward hook on the
instance. They tell the runtime where a layer's forward starts and ends, so that the saved
tensors of each layer form their own sub-unit; the forward hook also registers a gradient
hook on the layer's output, which fires when that layer's backward is about to run (the
gradient of its output is complete), so the layer's activations come back just before it
needs them. Everything outside the layers (embedding, final norm, output layer, loss) is the
unit's rest, moved with the unit.

Patch set ``layer hooks`` (:class:`~.patching.PatchSet`): a forward pre-hook and a forward
hook on each hooked ``megatron.core.transformer.transformer_layer.TransformerLayer`` instance
(or, for :func:`hook_layers`, any module given), their handles kept on the instance; removed
by :meth:`LayerHooks.remove` (the patch set's restore: before the layers are hooked again and
at uninstall). Hooking a layer again drops its old hooks first. Layers that
run under full recompute (``--recompute-granularity full``) save only their inputs through
the checkpoint: such chunks get no hooks and stream nothing (the unit moves as a whole).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_offload.integration.patching import PatchSet

HOOKS_MARKER = "_megatron_offload_layer_hooks"
"""The instance attribute that holds a hooked layer's two handles."""


def transformer_layers(chunk: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer layers of one model chunk, in the order its forward calls them."""
    from megatron.core.utils import get_attr_wrapped_model

    decoder = get_attr_wrapped_model(chunk, "decoder", allow_none=True)
    if decoder is None or not hasattr(decoder, "layers"):
        return []
    return list(decoder.layers)


def streams_layers(model_config) -> bool:
    """Whether the layers of this model save activations of their own (not under full
    recompute, where the checkpoint keeps only each group's input)."""
    return getattr(model_config, "recompute_granularity", None) != "full"


def layer_hook_set() -> PatchSet:
    """An empty ``layer hooks`` patch set."""
    return PatchSet("layer hooks", marker=HOOKS_MARKER)


@dataclass
class LayerHooks:
    layers_per_chunk: list[int]
    patches: PatchSet

    def remove(self) -> None:
        self.patches.restore()


def attach_layer_hooks(offloader, chunks, model_config) -> LayerHooks:
    """Hook every streamable layer of ``chunks`` to ``offloader`` (idempotent per layer)."""
    hooks = LayerHooks(layers_per_chunk=[], patches=layer_hook_set())
    stream = streams_layers(model_config)
    for chunk in chunks:
        layers = transformer_layers(chunk) if stream else []
        hooks.layers_per_chunk.append(len(layers))
        hook_layers(offloader, layers, hooks.patches)
    return hooks


def hook_layers(offloader, layers, patches: PatchSet | None = None) -> PatchSet:
    """Tell ``offloader`` where each module of ``layers`` (one chunk's layers, in call order)
    starts and ends its forward; the hooks join ``patches`` (default: a new ``layer hooks``
    set), which is returned. A layer hooked before loses its old hooks first."""
    patches = layer_hook_set() if patches is None else patches
    for index, layer in enumerate(layers):
        patches.hook(layer, pre=_pre_hook(offloader, index), post=_post_hook(offloader, index))
    return patches


def _pre_hook(offloader, index: int):
    def hook(module, args):
        offloader.layer_forward_starts(index)

    return hook


def _post_hook(offloader, index: int):
    def hook(module, args, output):
        offloader.layer_forward_ends(index, output)

    return hook
