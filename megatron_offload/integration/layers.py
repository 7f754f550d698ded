"""Transformer-layer boundaries for layer streaming (``--offload-granularity layer``).

Each of a model chunk's transformer layers (megatron-core's ``TransformerLayer``, the local
and the Transformer Engine spec alike) gets a forward pre-hook and a forward hook on the
instance. They tell the runtime where a layer's forward starts and ends, so that the saved
tensors of each layer form their own sub-unit; the forward hook also registers a gradient
hook on the layer's output, which fires when that layer's backward is about to run (the
gradient of its output is complete), so the layer's activations come back just before it
needs them. Everything outside the layers (embedding, final norm, output layer, loss) is the
unit's rest, moved with the unit.

Hooks are per instance and removed by :func:`detach_layer_hooks` (at uninstall). Layers that
run under full recompute (``--recompute-granularity full``) save only their inputs through
the checkpoint: such chunks get no hooks and stream nothing (the unit moves as a whole).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_HANDLES_ATTR = "_megatron_offload_layer_hooks"


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


@dataclass
class LayerHooks:
    layers_per_chunk: list[int]
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def attach_layer_hooks(offloader, chunks, model_config) -> LayerHooks:
    """Hook every streamable layer of ``chunks`` to ``offloader`` (idempotent per layer)."""
    hooks = LayerHooks(layers_per_chunk=[])
    stream = streams_layers(model_config)
    for chunk in chunks:
        layers = transformer_layers(chunk) if stream else []
        hooks.layers_per_chunk.append(len(layers))
        hooks.handles.extend(hook_layers(offloader, layers))
    return hooks


def hook_layers(offloader, layers) -> list:
    """Tell ``offloader`` where each module of ``layers`` (one chunk's layers, in call order)
    starts and ends its forward; returns the hook handles. A layer hooked before loses its
    old hooks first."""
    handles = []
    for index, layer in enumerate(layers):
        for handle in getattr(layer, _HANDLES_ATTR, None) or ():
            handle.remove()
        pair = (
            layer.register_forward_pre_hook(_pre_hook(offloader, index)),
            layer.register_forward_hook(_post_hook(offloader, index)),
        )
        setattr(layer, _HANDLES_ATTR, pair)
        handles.extend(pair)
    return handles


def detach_layer_hooks(chunks) -> None:
    for chunk in chunks:
        for layer in transformer_layers(chunk):
            for handle in getattr(layer, _HANDLES_ATTR, ()) or ():
                handle.remove()
            if hasattr(layer, _HANDLES_ATTR):
                delattr(layer, _HANDLES_ATTR)


def _pre_hook(offloader, index: int):
    def hook(module, args):
        offloader.layer_forward_starts(index)

    return hook


def _post_hook(offloader, index: int):
    def hook(module, args, output):
        offloader.layer_forward_ends(index, output)

    return hook
