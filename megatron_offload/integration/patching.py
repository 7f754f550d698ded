"""The one registry of what the plugin changes in Megatron, Megatron-LM and torch.

A :class:`PatchSet` is what one feature installs and removes as a whole; its
:meth:`~PatchSet.restore` is the one way back, for every kind of change it made. The patch
sets of the package, each listing the dotted symbols it replaces in its module docstring:

- ``megatron-core schedules`` (:mod:`.megatron_core`, with :mod:`.gis_schedule`): the
  pipeline schedule functions and the steps they call;
- ``layer hooks`` (:mod:`.layers`): forward hooks on transformer-layer instances;
- ``cpu_shims`` and ``cuda tensor type names`` (:mod:`.cpu.core`), ``training_shims``
  (:mod:`.cpu.training`): running Megatron without CUDA;
- ``megatron-lm`` (:mod:`.megatron_lm`): Megatron-LM's parser and training loop.

:meth:`PatchSet.install` takes :class:`Patch` rows, one per ``owner.attribute``, and first
checks that every target exists (a missing one is refused with an ImportError naming the
dotted symbol and the supported megatron-core range, before anything is replaced), then
replaces each in order. The replacement gets the original through ``make(original)`` (a
replacement this set installed before is seen through, so installing twice never wraps a
wrapper), keeps it as ``__wrapped__``, carries the set's marker attribute and is logged with
its dotted name. Restoring puts back exactly the object found (same identity), or deletes
the attribute where the owner did not hold it itself (an inherited attribute, or a name the
set created). Besides attributes a set can hold forward hooks on module instances
(:meth:`PatchSet.hook`) and entered context managers (:meth:`PatchSet.enter`), undone by the
same :meth:`~PatchSet.restore`, in the reverse order of installation.

Not thread-safe by itself: a set that can be installed from several threads is guarded by
its owner (``cpu.core``'s lock).
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

from megatron_offload.releases import SUPPORTED_TEXT, installed_megatron_version

log = logging.getLogger(__name__)

Kind = Literal["function", "stand_in", "proxy", "value"]
Missing = Literal["refuse", "create", "skip"]


class _Absent:
    """What an attribute or mapping entry is when the owner does not have it."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


class Item:
    """An owner that is a mapping (``sys.modules``): its entries are the "attributes"."""

    __slots__ = ("mapping", "label")

    def __init__(self, mapping: MutableMapping, label: str):
        self.mapping, self.label = mapping, label

    def __repr__(self) -> str:
        return self.label


def dotted(owner: Any, attribute: str) -> str:
    """The dotted name of ``owner.attribute`` for messages and logs
    (``megatron.core.pipeline_parallel.schedules.forward_step``, ``torch.Tensor.cuda``,
    ``sys.modules['fused_weight_gradient_mlp_cuda']``)."""
    if isinstance(owner, Item):
        return f"{owner.label}[{attribute!r}]"
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{attribute}"
    name = getattr(owner, "__name__", None)
    if isinstance(name, str):
        return f"{name}.{attribute}"
    return f"{type(owner).__module__}.{type(owner).__qualname__}.{attribute}"


def unwrapped(value: Any, marker: str) -> Any:
    """``value`` without the replacements that carry ``marker`` (their ``__wrapped__``)."""
    while getattr(value, marker, False) is True:
        value = value.__wrapped__
    return value


@dataclass(frozen=True, slots=True)
class Patch:
    """One ``owner.attribute`` to replace: ``make(original)`` returns the replacement.

    ``kind`` says what the replacement is and how it is marked:

    - ``function``: a function made for this original (a closure over it): it takes the
      original's name and docstring (``functools.update_wrapper``), ``__wrapped__`` and the
      set's marker;
    - ``stand_in``: a shared function that stands in for the original: installed through a
      fresh forwarding function with the stand-in's name, ``__wrapped__`` = the original and
      the marker (the shared function itself is not touched);
    - ``proxy``: an object standing in for the original (a proxy of a module): the marker and
      ``__wrapped__`` are set on it;
    - ``value``: installed as is, unmarked (a flag, a module, a class).

    ``missing``: what to do when the owner has no such attribute: ``refuse`` (ImportError
    naming the symbol and the supported megatron-core range), ``create`` (the set adds the
    name and deletes it again on restore) or ``skip`` (leave that target out).
    """

    owner: Any
    attribute: str
    make: Callable[[Any], Any]
    kind: Kind = "function"
    missing: Missing = "refuse"

    @classmethod
    def function(cls, owner, attribute: str, make: Callable[[Any], Any], *,
                 missing: Missing = "refuse") -> "Patch":
        return cls(owner, attribute, make, "function", missing)

    @classmethod
    def stand_in(cls, owner, attribute: str, function: Callable, *,
                 missing: Missing = "refuse") -> "Patch":
        return cls(owner, attribute, lambda original: function, "stand_in", missing)

    @classmethod
    def proxy(cls, owner, attribute: str, make: Callable[[Any], Any], *,
              missing: Missing = "refuse") -> "Patch":
        return cls(owner, attribute, make, "proxy", missing)

    @classmethod
    def value(cls, owner, attribute: str, value: Any, *, missing: Missing = "refuse") -> "Patch":
        return cls(owner, attribute, lambda original: value, "value", missing)

    @property
    def symbol(self) -> str:
        return dotted(self.owner, self.attribute)


@dataclass(slots=True)
class _Replaced:
    owner: Any
    attribute: str
    found: Any
    """What the owner held before (ABSENT: nothing), put back on restore."""
    own: bool
    """Whether the owner held it itself (else it was inherited or absent: deleted on restore)."""
    original: Any
    """``found`` without this set's earlier replacements: what ``make`` was given."""
    symbol: str

    def undo(self) -> None:
        if self.own:
            _write(self.owner, self.attribute, self.found)
        else:
            _delete(self.owner, self.attribute)


@dataclass(slots=True)
class _Hooked:
    module: Any
    handles: tuple
    marker: str
    symbol: str

    def undo(self) -> None:
        for handle in self.handles:
            handle.remove()
        if vars(self.module).get(self.marker) is self.handles:
            delattr(self.module, self.marker)


@dataclass(slots=True)
class _Entered:
    context: Any
    symbol: str

    def undo(self) -> None:
        self.context.__exit__(None, None, None)


def _read(owner: Any, attribute: str) -> tuple[bool, Any]:
    """(whether the owner holds ``attribute`` itself, the value seen now or ABSENT)."""
    if isinstance(owner, Item):
        return attribute in owner.mapping, owner.mapping.get(attribute, ABSENT)
    own = attribute in vars(owner)
    return own, (vars(owner)[attribute] if own else getattr(owner, attribute, ABSENT))


def _write(owner: Any, attribute: str, value: Any) -> None:
    if isinstance(owner, Item):
        owner.mapping[attribute] = value
    else:
        setattr(owner, attribute, value)


def _delete(owner: Any, attribute: str) -> None:
    if isinstance(owner, Item):
        owner.mapping.pop(attribute, None)
    else:
        delattr(owner, attribute)


class PatchSet:
    """Replacements (and hooks, and entered contexts) installed together and restored
    together. ``name`` appears in logs and refusals; ``marker`` is the attribute every marked
    replacement carries (``True``), by which a second install sees through the first;
    ``log_level`` the level of the line logged per replaced symbol."""

    def __init__(self, name: str, *, marker: str, log_level: int = logging.DEBUG) -> None:
        self.name = name
        self.marker = marker
        self.log_level = log_level
        self._entries: list[_Replaced | _Hooked | _Entered] = []

    def __repr__(self) -> str:
        return f"<PatchSet {self.name!r}: {len(self._entries)} installed>"

    @property
    def installed(self) -> bool:
        """Whether anything of this set is in place."""
        return bool(self._entries)

    def symbols(self) -> list[str]:
        """The dotted names of what this set has in place, in installation order."""
        return [entry.symbol for entry in self._entries]

    def original(self, owner: Any, attribute: str) -> Any:
        """The original behind this set's replacement of ``owner.attribute`` (KeyError if this
        set did not replace it)."""
        for entry in self._entries:
            if (isinstance(entry, _Replaced) and entry.owner is owner
                    and entry.attribute == attribute):
                return entry.original
        raise KeyError(dotted(owner, attribute))

    # ------------------------------------------------------------------------ installing
    def refusal(self, symbol: str) -> ImportError:
        """The error for a target the installed release lacks."""
        try:
            version = installed_megatron_version()
        except ImportError:
            version = "not installed"
        return ImportError(
            f"{symbol} not found: {self.name} targets {SUPPORTED_TEXT} (this is megatron-core "
            f"{version}); the installed build may differ"
        )

    def install(self, patches: Iterable[Patch]) -> None:
        """Replace every target of ``patches``, in order, after checking that each exists
        (or may be created or skipped). Nothing is replaced when a target is refused; if a
        replacement fails to build, what this call replaced is restored before the error
        propagates."""
        patches = list(patches)
        present = []
        for patch in patches:
            if _read(patch.owner, patch.attribute)[1] is ABSENT:
                if patch.missing == "refuse":
                    raise self.refusal(patch.symbol)
                if patch.missing == "skip":
                    continue
            present.append(patch)
        done = len(self._entries)
        try:
            for patch in present:
                self._replace(patch)
        except BaseException:
            while len(self._entries) > done:
                self._entries.pop().undo()
            raise

    def _replace(self, patch: Patch) -> None:
        own, found = _read(patch.owner, patch.attribute)
        original = unwrapped(found, self.marker)
        replacement = self._marked(patch, original)
        _write(patch.owner, patch.attribute, replacement)
        self._entries.append(
            _Replaced(patch.owner, patch.attribute, found, own, original, patch.symbol))
        log.log(self.log_level, "megatron-offload: patched %s", patch.symbol)

    def _marked(self, patch: Patch, original: Any) -> Any:
        made = patch.make(original)
        if patch.kind == "value":
            return made
        if patch.kind == "proxy":
            object.__setattr__(made, self.marker, True)
            object.__setattr__(made, "__wrapped__", original)
            return made
        if patch.kind == "stand_in":
            target = made

            @functools.wraps(target)
            def stand_in(*args, **kwargs):
                return target(*args, **kwargs)

            made = stand_in
        elif original is not ABSENT:
            functools.update_wrapper(made, original)
        made.__wrapped__ = original
        setattr(made, self.marker, True)
        return made

    def hook(self, module: Any, *, pre: Callable, post: Callable) -> tuple:
        """Register ``pre`` / ``post`` as forward pre-hook and forward hook of ``module`` (an
        ``nn.Module`` instance). The handles are kept on the instance under the set's marker:
        a module hooked before (by any set with this marker) loses those hooks first."""
        for handle in getattr(module, self.marker, None) or ():
            handle.remove()
        handles = (module.register_forward_pre_hook(pre), module.register_forward_hook(post))
        setattr(module, self.marker, handles)
        symbol = f"{type(module).__module__}.{type(module).__qualname__}.forward (one instance)"
        self._entries.append(_Hooked(module, handles, self.marker, symbol))
        log.log(self.log_level, "megatron-offload: hooked %s", symbol)
        return handles

    def enter(self, context: Any, symbol: str) -> Any:
        """Enter ``context`` (a context manager, e.g. a ``TorchFunctionMode``) until restore."""
        value = context.__enter__()
        self._entries.append(_Entered(context, symbol))
        log.log(self.log_level, "megatron-offload: entered %s", symbol)
        return value

    # ------------------------------------------------------------------------- restoring
    def restore(self) -> bool:
        """Undo everything this set has in place, last first. Returns whether there was
        anything to undo."""
        if not self._entries:
            return False
        while self._entries:
            self._entries.pop().undo()
        return True


__all__ = ["ABSENT", "Item", "Patch", "PatchSet", "dotted", "unwrapped"]
