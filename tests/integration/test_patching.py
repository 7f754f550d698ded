"""The patch registry (``integration/patching.py``): install, see through, refuse, restore
exactly; and every patch set of the package lists the dotted symbols it replaces."""
from __future__ import annotations

import logging
import types

import pytest
import torch

from megatron_offload.integration.patching import ABSENT, Item, Patch, PatchSet, dotted, unwrapped
from megatron_offload.releases import SUPPORTED_TEXT

from _patch_docs import listed_symbols

MARKER = "_test_patch"


def _module():
    module = types.ModuleType("demo.owner")

    def greet(name):
        """Says hello."""
        return f"hello {name}"

    module.greet = greet
    module.flag = False
    return module


def _loud(original):
    def greet(name):
        return original(name).upper()

    return greet


def test_a_function_patch_keeps_the_original_marks_and_logs(caplog):
    module = _module()
    original = module.greet
    patches = PatchSet("demo", marker=MARKER, log_level=logging.INFO)
    with caplog.at_level(logging.INFO, logger="megatron_offload.integration.patching"):
        patches.install([Patch.function(module, "greet", _loud)])
    assert module.greet("x") == "HELLO X"
    assert module.greet.__wrapped__ is original and getattr(module.greet, MARKER) is True
    assert module.greet.__doc__ == "Says hello." and module.greet.__name__ == "greet"
    assert "megatron-offload: patched demo.owner.greet" in caplog.text
    assert patches.installed and patches.symbols() == ["demo.owner.greet"]
    assert patches.original(module, "greet") is original
    assert patches.restore() is True
    assert module.greet is original and not patches.installed
    assert patches.restore() is False


def test_a_second_install_sees_through_the_first():
    module = _module()
    original = module.greet
    first, second = PatchSet("a", marker=MARKER), PatchSet("b", marker=MARKER)
    first.install([Patch.function(module, "greet", _loud)])
    patched = module.greet
    second.install([Patch.function(module, "greet", _loud)])
    assert module.greet("x") == "HELLO X"  # not wrapped twice: the original's output, once
    assert module.greet.__wrapped__ is original is unwrapped(module.greet, MARKER)
    second.restore()
    assert module.greet is patched  # exactly what the second set found
    first.restore()
    assert module.greet is original


def test_a_missing_target_is_refused_before_anything_is_replaced():
    module = _module()
    original = module.greet
    patches = PatchSet("demo", marker=MARKER)
    with pytest.raises(ImportError) as info:
        patches.install([Patch.function(module, "greet", _loud),
                         Patch.function(module, "vanished", _loud)])
    message = str(info.value)
    assert "demo.owner.vanished not found: demo targets" in message and SUPPORTED_TEXT in message
    assert module.greet is original and not patches.installed


def test_a_replacement_that_fails_to_build_restores_what_the_call_replaced():
    module = _module()
    original = module.greet

    def broken(original):
        raise RuntimeError("cannot build")

    patches = PatchSet("demo", marker=MARKER)
    with pytest.raises(RuntimeError, match="cannot build"):
        patches.install([Patch.function(module, "greet", _loud),
                         Patch.function(module, "flag", broken)])
    assert module.greet is original and not patches.installed


def test_created_skipped_inherited_and_mapping_targets():
    module = _module()
    mapping = {}

    class Base:
        def size(self):
            return 1

    class Child(Base):
        pass

    patches = PatchSet("demo", marker=MARKER)
    patches.install([
        Patch.value(module, "added", 42, missing="create"),
        Patch.value(module, "absent", 1, missing="skip"),
        Patch.value(Item(mapping, "registry"), "key", "v", missing="create"),
        Patch.stand_in(Child, "size", lambda self: 2),
        Patch.value(module, "flag", True),
    ])
    assert module.added == 42 and not hasattr(module, "absent") and mapping == {"key": "v"}
    assert Child().size() == 2 and Child.size.__wrapped__ is Base.size
    assert module.flag is True and not hasattr(module.flag, MARKER)  # values go in unmarked
    assert patches.symbols() == ["demo.owner.added", "registry['key']",
                                 f"{__name__}.{Child.__qualname__}.size", "demo.owner.flag"]
    patches.restore()
    assert not hasattr(module, "added") and mapping == {} and module.flag is False
    assert "size" not in vars(Child) and Child().size() == 1  # inherited: deleted again


def test_a_proxy_is_marked_in_place():
    module = _module()
    proxy = types.SimpleNamespace()
    patches = PatchSet("demo", marker=MARKER)
    patches.install([Patch.proxy(module, "greet", lambda original: proxy)])
    assert module.greet is proxy and proxy.__wrapped__("y") == "hello y"
    assert getattr(proxy, MARKER) is True
    patches.restore()


def test_hooks_and_contexts_are_undone_by_the_same_restore_last_first():
    layer = torch.nn.Linear(2, 2)
    calls, events = [], []

    class Context:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append(("exit", len(layer._forward_hooks)))

    patches = PatchSet("demo", marker=MARKER)
    patches.hook(layer, pre=lambda m, a: calls.append("pre"),
                 post=lambda m, a, o: calls.append("post"))
    patches.enter(Context(), "demo context")
    layer(torch.zeros(1, 2))
    assert calls == ["pre", "post"] and events == ["enter"]
    # hooked again (a new set, same marker): the old hooks go first
    again = PatchSet("again", marker=MARKER)
    again.hook(layer, pre=lambda m, a: calls.append("pre2"), post=lambda m, a, o: None)
    layer(torch.zeros(1, 2))
    assert calls == ["pre", "post", "pre2"]
    patches.restore()
    assert events == ["enter", ("exit", 1)]  # the context went before the hooks
    assert len(layer._forward_pre_hooks) == 1 and hasattr(layer, MARKER)  # not the old set's
    again.restore()
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    assert not hasattr(layer, MARKER)


def test_dotted_names():
    assert dotted(torch.Tensor, "cuda") == "torch.Tensor.cuda"
    assert dotted(torch.cuda, "synchronize") == "torch.cuda.synchronize"
    assert dotted(Item({}, "sys.modules"), "x") == "sys.modules['x']"
    assert repr(ABSENT) == "<absent>"


# ------------------------------------------------ each patch set lists what it replaces
def test_the_schedule_patch_sets_list_their_symbols():
    from megatron_offload.config import OffloadConfig
    from megatron_offload.integration import gis_schedule, megatron_core

    for schedule in ("megatron", "gis"):
        runtime = megatron_core.install(OffloadConfig(schedule=schedule))
        try:
            symbols = runtime.patches.symbols()
        finally:
            megatron_core.uninstall()
        assert len(symbols) == 5
        assert [s for s in symbols if s not in listed_symbols(megatron_core.__doc__)] == []
    gis = [s for s in symbols if s.endswith("_interleaving")]
    assert len(gis) == 2 and [s for s in gis if s not in listed_symbols(gis_schedule.__doc__)] == []


def test_the_cpu_patch_sets_list_their_symbols():
    from megatron_offload.integration.cpu import core

    symbols = {p.symbol for keep in (True, False) for p in core._patches(keep)}
    assert [s for s in sorted(symbols) if s not in listed_symbols(core.__doc__)] == []
    assert "torch.Tensor.type" in listed_symbols(core.__doc__)  # cuda_tensor_type_names' set


def test_layer_hooks_are_one_patch_set():
    from megatron_offload.integration.layers import attach_layer_hooks

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))

    class Chunk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = Decoder()

    chunk = Chunk()
    offloader = types.SimpleNamespace(layer_forward_starts=lambda i: None,
                                      layer_forward_ends=lambda i, o: None)
    first = attach_layer_hooks(offloader, [chunk], types.SimpleNamespace())
    second = attach_layer_hooks(offloader, [chunk], types.SimpleNamespace())
    assert first.layers_per_chunk == second.layers_per_chunk == [3]
    assert all(len(layer._forward_hooks) == 1 for layer in chunk.decoder.layers)
    second.remove()
    first.remove()
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks
               for layer in chunk.decoder.layers)
    full = attach_layer_hooks(offloader, [chunk],
                              types.SimpleNamespace(recompute_granularity="full"))
    assert full.layers_per_chunk == [0] and not full.patches.installed
