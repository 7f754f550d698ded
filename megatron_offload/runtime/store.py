"""Saved-tensor capture per (model chunk, microbatch) unit: what stays, what may move.

A unit's forward runs inside :meth:`ActivationStore.capture`, a pair of autograd saved-tensor
hooks. A unit is made of sub-units: with layer streaming one per transformer layer (the
runtime tells the store, from the layer hooks, which layer is running) and "the rest"
(layer None: embedding, final norm, output layer, loss, the received input); at unit
granularity the rest is everything. At pack time each saved tensor is screened and recorded
with the sub-unit that saved it last (the first to need it again in the backward). A storage
is decided at the first boundary (a layer's start or end, the forward's return) where nothing
but this unit's saved tensors references it (:meth:`ActivationStore.decide`,
:meth:`ActivationStore.seal`); it then moves with that sub-unit if the runtime list streams
it. What stays:

- parameters, views of parameters, tensor subclasses, tensors on another device, tensors
  smaller than ``min_offload_bytes``, tensors marked with :func:`mark_not_offloadable`,
  storages that cannot be resized, storages their owner already released (Megatron's
  ``CheckpointWithoutOutput`` shrinks its output to 0 bytes during the forward and regrows it
  by recompute), and storages still referenced by anything besides this unit's saved tensors
  when the forward returned (caches: autocast's weight casts, rotary tables, a module's
  buffers; another unit can only read a storage it can reach);
- the chunk output (an asynchronous send may still read it).

The received inputs the schedule handed to the forward always move with their sub-unit (the
schedule keeps them until the backward, so they are this unit's memory).

Moving is done on whole storages *in place*: offload copies the bytes out and shrinks the
storage to zero bytes; reload grows it back and copies the bytes in. Every alias of the storage
(autograd's saved views, the schedule's own reference to the received input tensor) sees the
bytes leave and come back, so nothing else needs to be released or rebuilt, and numerics are
bitwise unchanged.

Two things autograd does without hooks and stops doing with them are restored here:

- version counters: autograd checks a saved tensor's version at unpack only when no hooks are
  installed. The store records the version at pack and raises autograd's error at unpack, so
  an in-place write after save stays a loud error instead of a silently wrong gradient;
- parameter identity: with hooks, ``ctx.saved_tensors`` returns a new tensor object for a saved
  Parameter, without its Python attributes (``main_grad``, ``grad_added_to_main_grad``), so
  Megatron's and Transformer Engine's fused weight-gradient accumulation lose track of it.
  :func:`preserve_saved_parameters` makes ``ctx.saved_tensors`` return the Parameter object
  itself, as autograd does without hooks.
"""
from __future__ import annotations

import contextlib
import enum
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch

from megatron_offload.runtime.accounting import ResidentStorageTracker, StorageWeakSet
from megatron_offload.schedule.ir import LayerKey, UnitKey

_KEEP_ATTR = "_megatron_offload_keep"


def mark_not_offloadable(tensor: torch.Tensor) -> torch.Tensor:
    """Keep ``tensor``'s storage on the device whenever autograd saves it (returns it)."""
    setattr(tensor, _KEEP_ATTR, True)
    return tensor


def storage_use_count(storage: torch.UntypedStorage) -> int:
    """References to the storage's memory: tensors over it and live Python storage objects."""
    return torch._C._storage_Use_Count(storage._cdata)


# ------------------------------------------------------------------- parameter identity
_identity = threading.local()
_identity_users = 0
_ORIGINAL_SAVED_TENSORS = torch._C._FunctionBase.__dict__["saved_tensors"]


def _saved_tensors_with_parameters(ctx):
    frame: list[torch.Tensor] = []
    stack = getattr(_identity, "stack", None)
    if stack is None:
        stack = _identity.stack = []
    stack.append(frame)
    try:
        tensors = _ORIGINAL_SAVED_TENSORS.__get__(ctx)
    finally:
        stack.pop()
    if not frame:
        return tensors
    # Our unpack hook saw these Parameters, in the order autograd unpacked them.
    restored = list(tensors)
    pending = iter(frame)
    param = next(pending, None)
    for i, t in enumerate(restored):
        if param is None:
            break
        if isinstance(t, torch.Tensor) and _same_view(t, param):
            restored[i] = param
            param = next(pending, None)
    return tuple(restored)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _note_unpacked_parameter(param: torch.nn.Parameter) -> None:
    stack = getattr(_identity, "stack", None)
    if stack:
        stack[-1].append(param)


@contextlib.contextmanager
def preserve_saved_parameters():
    """While active, custom autograd Functions get saved Parameters back as themselves.

    Patches ``torch.autograd.function.BackwardCFunction.saved_tensors`` (the ``ctx`` class of
    every custom Function); nested uses share one patch, the last exit removes it.
    """
    global _identity_users
    from torch.autograd.function import BackwardCFunction

    if _identity_users == 0:
        BackwardCFunction.saved_tensors = property(_saved_tensors_with_parameters)
    _identity_users += 1
    try:
        yield
    finally:
        _identity_users -= 1
        if _identity_users == 0:
            del BackwardCFunction.saved_tensors


# ------------------------------------------------------------------------------- units
class UnitState(enum.Enum):
    CAPTURING = "capturing"  # its forward is running
    RESIDENT = "resident"
    OFFLOADED = "offloaded"  # device bytes released; the D2H copy may still be in flight
    RELOADING = "reloading"  # storages regrown; the H2D copy may still be in flight


@dataclass(slots=True, eq=False)
class SubUnitStorages:
    """The storages one sub-unit (a layer of a unit, or the rest: ``layer`` None, see
    ``schedule.ir.LayerKey``) moves, and where its bytes are."""

    layer: LayerKey
    streams: bool = False
    """The runtime list offloads this sub-unit (its storages are moved when decided)."""
    state: UnitState = UnitState.RESIDENT
    movable: dict[int, torch.UntypedStorage] = field(default_factory=dict)
    """Storages this sub-unit moves, by id (strong references: a storage shrunk to zero bytes
    costs nothing, and holding it is what lets it be grown back in place)."""
    sizes: dict[int, int] = field(default_factory=dict)
    host: dict[int, torch.Tensor] = field(default_factory=dict)
    unsent: list[int] = field(default_factory=list)
    """Decided to move, not copied yet (its offload op has not come)."""
    d2h: object | None = None
    """The latest device -> host copy of this sub-unit (copies of one stream run in order)."""
    offloaded_at: tuple[int, float] = (0, 0.0)
    """(compute entries run, perf_counter) when its offload op ran."""
    h2d: object | None = None


    def forget_storages(self) -> None:
        """Drop the strong references (the bytes are back and no copy reads them)."""
        self.movable.clear()
        self.host.clear()


@dataclass(slots=True, eq=False)
class UnitActivations:
    key: UnitKey
    state: UnitState = UnitState.CAPTURING
    subunits: dict[LayerKey, SubUnitStorages] = field(default_factory=dict)
    current: LayerKey = None
    """While capturing: the sub-unit whose forward runs (None outside the layers)."""
    pending: dict[int, torch.UntypedStorage] = field(default_factory=dict)
    """While capturing: storages that passed the pack-time screen and are not decided yet."""
    owner: dict[int, LayerKey] = field(default_factory=dict)
    """The last sub-unit that saved each storage: the first to need it in the backward."""
    holders: Counter = field(default_factory=Counter)
    """How many saved tensors of this unit hold each storage."""
    vetoed: set[int] = field(default_factory=set)
    kept: dict[int, weakref.ref] = field(default_factory=dict)
    """Every storage the unit's saved tensors use (measuring only), movable or not."""
    skipped_released: int = 0
    """Candidate storages already released by their owner when the forward returned."""
    skipped_shared: int = 0
    """Candidate storages referenced outside this unit's saved tensors (caches)."""
    location: dict[int, LayerKey] = field(default_factory=dict)
    """Which sub-unit moves each movable storage."""

    def sub(self, layer: LayerKey) -> SubUnitStorages:
        sub = self.subunits.get(layer)
        if sub is None:
            sub = self.subunits[layer] = SubUnitStorages(layer)
        return sub

    @property
    def movable(self) -> dict[int, torch.UntypedStorage]:
        """Every storage the unit moves, all sub-units together."""
        out: dict[int, torch.UntypedStorage] = {}
        for sub in self.subunits.values():
            out.update(sub.movable)
        return out

    def where(self, sid: int) -> SubUnitStorages | None:
        """The sub-unit that moves storage ``sid`` (None: it stays)."""
        layer = self.location.get(sid, _NOWHERE)
        return None if layer is _NOWHERE else self.subunits[layer]


_NOWHERE = object()


class _Held:
    """What the pack hook returns: the tensor, its version at save, the unit that saved it."""

    __slots__ = ("tensor", "version", "unit")

    def __init__(self, tensor: torch.Tensor, version: int, unit: UnitActivations | None) -> None:
        self.tensor = tensor
        self.version = version
        self.unit = unit


class _HeldParameter(_Held):
    __slots__ = ()


def _check_version(held: _Held) -> None:
    now = held.tensor._version
    if now != held.version:
        t = held.tensor
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{t.type()} {list(t.shape)}] is at version {now}; expected "
            f"version {held.version} instead. (Checked by megatron-offload, since autograd "
            "does not check versions while saved-tensor hooks are installed.) Hint: find the "
            "in-place write to this tensor after it was saved, or clone() it before writing."
        )


class ActivationStore:
    """Screens saved tensors per unit, decides what moves, keeps the per-unit records."""

    def __init__(
        self,
        *,
        min_offload_bytes: int,
        device_type: str,
        tracker: ResidentStorageTracker | None = None,
    ) -> None:
        self.min_offload_bytes = min_offload_bytes
        self.device_type = device_type
        self.tracker = tracker
        self.units: dict[UnitKey, UnitActivations] = {}
        # Model parameters and buffers: never candidates (a fast path, the reference count
        # rule would keep them too). Weak, so a rebuilt model's old storages can go.
        self._persistent = StorageWeakSet()

    def add_persistent(self, tensors) -> None:
        """Never move these tensors' storages (model parameters, buffers)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._persistent.add(t.untyped_storage())

    def drop_all(self) -> None:
        """Forget every unit (after a fault, once their storages were restored)."""
        self.units.clear()

    # --------------------------------------------------------------------------- capture
    @contextlib.contextmanager
    def capture(self, key: UnitKey, *, streams: set[LayerKey] = frozenset()):
        """Run a unit's forward under saved-tensor hooks; ``streams``: the sub-units the
        runtime list offloads (their candidates are screened and decided)."""
        if key in self.units:
            raise RuntimeError(f"unit (chunk, microbatch) = {key} captured twice in one iteration")
        unit = UnitActivations(key=key)
        for layer in streams:
            unit.sub(layer).streams = True
        self.units[key] = unit
        tracker = self.tracker
        offload = bool(streams)

        def pack(t: torch.Tensor):
            if isinstance(t, torch.nn.Parameter):
                return _HeldParameter(t, t._version, None)
            held = _Held(t.detach(), t._version, unit)
            if isinstance(t._base, torch.nn.Parameter):  # weight.t() saved by a linear
                return held
            storage = t.untyped_storage()
            if storage in self._persistent:
                return held
            if tracker is not None and t.device.type == self.device_type:
                tracker.track(storage)
                unit.kept[id(storage)] = weakref.ref(storage)
            if offload:
                sid = id(storage)
                unit.holders[sid] += 1
                if self._screen(t, storage):
                    unit.pending.setdefault(sid, storage)
                    unit.owner[sid] = unit.current
                else:
                    unit.vetoed.add(sid)
            return held

        def unpack(held):
            if isinstance(held, _HeldParameter):
                _check_version(held)
                _note_unpacked_parameter(held.tensor)
                return held.tensor
            sub = held.unit.where(id(held.tensor.untyped_storage()))
            if sub is not None and sub.state in (UnitState.OFFLOADED, UnitState.RELOADING):
                where = "" if sub.layer is None else f", layer {sub.layer}"
                raise RuntimeError(
                    f"activation of unit (chunk, microbatch) = {held.unit.key}{where} used "
                    f"while {sub.state.value}: its reload was not issued before its backward "
                    "(runtime list and execution order disagree)"
                )
            _check_version(held)
            return held.tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield unit

    def _screen(self, t: torch.Tensor, storage: torch.UntypedStorage) -> bool:
        """Pack-time checks that do not depend on what happens later in the forward."""
        if type(t) is not torch.Tensor or t.device.type != self.device_type:
            return False
        if getattr(t, _KEEP_ATTR, False) or not storage.resizable():
            return False
        return storage.nbytes() >= max(self.min_offload_bytes, 1)

    def decide(self, unit: UnitActivations) -> None:
        """Decide the pending storages nothing else references any more (a layer boundary).

        A candidate moves when nothing but this unit's saved tensors (and the store's own
        handle) references its storage: nobody else can then read it before the backward.
        It moves with the last sub-unit that saved it (the first to need it again), if that
        sub-unit streams; otherwise it stays. Still referenced: decided later.
        """
        self._decide(unit, final=False, forced=set())

    def seal(self, unit: UnitActivations, inputs, outputs) -> None:
        """The unit's forward returned ``outputs``: decide every storage still pending.

        The chunk output never moves (an asynchronous send may still read it; Megatron's
        deallocate_pipeline_outputs releases it). The received inputs move with the
        sub-unit that saved them last (the schedule keeps them until the backward, so they
        are this unit's memory), unless they are the output too.
        """
        if unit.state is UnitState.CAPTURING:
            unit.state = UnitState.RESIDENT
        if not any(sub.streams for sub in unit.subunits.values()):
            unit.pending, unit.holders, unit.vetoed, unit.owner = {}, Counter(), set(), {}
            return
        unit.vetoed |= {id(out.untyped_storage()) for out in outputs}
        forced = set()
        for t in inputs:
            storage = t.untyped_storage()
            sid = id(storage)
            if sid not in unit.vetoed and self._screen(t, storage):
                unit.pending.setdefault(sid, storage)
                forced.add(sid)
        self._decide(unit, final=True, forced=forced)
        unit.pending, unit.holders, unit.vetoed, unit.owner = {}, Counter(), set(), {}

    def _decide(self, unit: UnitActivations, *, final: bool, forced: set[int]) -> None:
        pending, holders = unit.pending, unit.holders
        for sid, storage in list(pending.items()):
            if sid in unit.vetoed:
                del pending[sid]
                continue
            size = storage.nbytes()
            if size == 0:  # released by its owner (recomputed before the backward)
                unit.skipped_released += 1
                del pending[sid]
                continue
            # + 1: the Python storage object in ``pending`` holds a reference too.
            if sid not in forced and storage_use_count(storage) > holders[sid] + 1:
                if final:
                    unit.skipped_shared += 1
                    del pending[sid]
                continue
            del pending[sid]
            sub = unit.subunits.get(unit.owner.get(sid))
            if sub is None or not sub.streams:
                continue
            sub.movable[sid] = storage
            sub.sizes[sid] = size
            sub.unsent.append(sid)
            unit.location[sid] = sub.layer

    def release(self, key: UnitKey) -> UnitActivations:
        """The unit's backward finished: forget it (its storages are autograd's to free)."""
        return self.units.pop(key)
