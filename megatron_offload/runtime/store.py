"""Saved-tensor capture per (model chunk, microbatch) unit: what stays, what may move.

A unit's forward runs inside :meth:`ActivationStore.capture`, a pair of autograd saved-tensor
hooks. Each saved tensor is classified once, at pack time:

- stays on the device: parameters, views of parameters and tensor subclasses, tensors on another device, tensors
  smaller than ``min_offload_bytes``, tensors marked with :func:`mark_not_offloadable`,
  storages that cannot be resized, and storages that outlive the unit (caches such as rotary
  tables: seen by another unit, or alive across an iteration boundary);
- may move: everything else. A storage shared by several saved views is recorded once.

Moving is done on whole storages *in place*: offload copies the bytes out and shrinks the
storage to zero bytes; reload grows it back and copies the bytes in. Every alias of the storage
(autograd's saved views, the schedule's own reference to the received input tensor) sees the
bytes leave and come back, so nothing else needs to be released or rebuilt, and numerics are
bitwise unchanged.

Tensors created inside a custom autograd Function (Transformer Engine, Megatron's fused
cross entropy) carry no ``grad_fn`` and could in principle be caches shared across units; such
tensors move only from the second iteration on, once sharing and persistence have been
observed for one iteration.
"""
from __future__ import annotations

import contextlib
import enum
import weakref
from dataclasses import dataclass, field

import torch

from megatron_offload.runtime.accounting import ResidentStorageTracker, StorageWeakSet

UnitKey = tuple[int, int]  # (model chunk, microbatch)

_KEEP_ATTR = "_megatron_offload_keep"


def mark_not_offloadable(tensor: torch.Tensor) -> torch.Tensor:
    """Keep ``tensor`` on the device whenever autograd saves it (returns it for chaining)."""
    setattr(tensor, _KEEP_ATTR, True)
    return tensor


class UnitState(enum.Enum):
    CAPTURING = "capturing"  # its forward is running
    RESIDENT = "resident"
    OFFLOADING = "offloading"  # D2H copy in flight; device bytes still allocated
    OFFLOADED = "offloaded"  # device bytes freed; host copy complete
    RELOADING = "reloading"  # H2D copy in flight into re-grown storages


@dataclass(slots=True, eq=False)
class UnitActivations:
    key: UnitKey
    state: UnitState = UnitState.CAPTURING
    movable: dict[int, torch.UntypedStorage] = field(default_factory=dict)
    """Storages this unit may move, by id (strong references: a storage shrunk to zero bytes
    costs nothing, and holding it is what lets it be grown back in place)."""
    sizes: dict[int, int] = field(default_factory=dict)
    shadowed: set[int] = field(default_factory=set)
    """Storages copied out but kept on the device: candidates whose ownership is still being
    observed (first iteration). Copying them anyway sizes the host pool for the steady state."""
    host: dict[int, torch.Tensor] = field(default_factory=dict)
    transfer: object | None = None
    kept: dict[int, weakref.ref] = field(default_factory=dict)
    """Every storage the unit's saved tensors use (measuring only), movable or not."""

    def add(self, storage: torch.UntypedStorage, *, shadow: bool = False) -> None:
        sid = id(storage)
        if sid not in self.movable:
            self.movable[sid] = storage
            self.sizes[sid] = storage.nbytes()
            if shadow:
                self.shadowed.add(sid)

    def exclude(self, storage: torch.UntypedStorage) -> None:
        self.movable.pop(id(storage), None)
        self.sizes.pop(id(storage), None)
        self.shadowed.discard(id(storage))

    def freed_storages(self):
        return [s for sid, s in self.movable.items() if sid not in self.shadowed]


class _Saved:
    """What the pack hook returns for a tensor of an offloadable unit."""

    __slots__ = ("unit", "tensor")

    def __init__(self, unit: UnitActivations, tensor: torch.Tensor) -> None:
        self.unit = unit
        self.tensor = tensor


class ActivationStore:
    """Classifies saved tensors per unit and keeps the per-unit records."""

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
        self.iteration = 0
        # Storages that outlive a unit: never moved. Weak, so they do not pin memory.
        self._persistent = StorageWeakSet()
        # Storages without grad_fn packed in this iteration -> the unit that packed them first.
        self._first_owner: dict[int, tuple[weakref.ref, UnitKey]] = {}

    # ----------------------------------------------------------------- iteration boundaries
    def begin_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        # Anything still alive from the previous iteration is a cache, not an activation.
        for ref, _ in self._first_owner.values():
            storage = ref()
            if storage is not None and storage.nbytes() > 0:
                self._persistent.add(storage)
        self._first_owner.clear()

    def add_persistent(self, tensors) -> None:
        """Never move these tensors' storages (model parameters, buffers, caches)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._persistent.add(t.untyped_storage())

    def drop_all(self) -> None:
        """Forget every unit (after a fault); restores nothing."""
        self.units.clear()
        self._first_owner.clear()

    # --------------------------------------------------------------------------- capture
    @contextlib.contextmanager
    def capture(self, key: UnitKey, *, offload: bool, inputs: tuple = ()):
        """Run a unit's forward under saved-tensor hooks.

        ``offload``: record movable storages for this unit. ``inputs``: the tensors the
        schedule handed to this forward (received activations); they belong to the unit even
        though they carry no ``grad_fn``.
        """
        if key in self.units:
            raise RuntimeError(f"unit (chunk, microbatch) = {key} captured twice in one iteration")
        unit = UnitActivations(key=key)
        self.units[key] = unit
        owned_inputs = {
            id(t.untyped_storage()) for t in inputs if isinstance(t, torch.Tensor)
        }
        tracker = self.tracker

        def pack(t: torch.Tensor):
            # Parameters and their views (weight.t() saved by a linear) are not activations.
            if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
                return t.detach()
            storage = t.untyped_storage()
            if storage in self._persistent:
                return t.detach()
            if tracker is not None and t.device.type == self.device_type:
                tracker.track(storage)
                unit.kept[id(storage)] = weakref.ref(storage)
            movable = self._movable(t, storage, key, owned_inputs) if offload else None
            if movable is not None:
                unit.add(storage, shadow=movable == "shadow")
                return _Saved(unit, t.detach())
            return t.detach()

        def unpack(saved):
            if isinstance(saved, _Saved):
                if saved.unit.state not in (UnitState.RESIDENT, UnitState.CAPTURING):
                    raise RuntimeError(
                        f"activation of unit (chunk, microbatch) = {saved.unit.key} used while "
                        f"{saved.unit.state.value}: its reload was not issued before its "
                        "backward (schedule order and offload plan disagree)"
                    )
                return saved.tensor
            return saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield unit
        if unit.state is UnitState.CAPTURING:
            unit.state = UnitState.RESIDENT

    def seal(self, unit: UnitActivations, inputs, outputs, *, offload: bool) -> None:
        """After the unit's forward returned ``outputs``.

        The chunk output may still be read by an asynchronous send: it is never freed here
        (Megatron's deallocate_pipeline_outputs releases it once sent). The received inputs
        move with the unit even when no layer saved them: the schedule holds them until the
        backward, so they are this unit's memory.
        """
        output_ids = {id(out.untyped_storage()) for out in outputs}
        for out in outputs:
            unit.exclude(out.untyped_storage())
        if not offload:
            return
        owned = {id(t.untyped_storage()) for t in inputs}
        for t in inputs:
            storage = t.untyped_storage()
            if id(storage) not in output_ids and self._movable(t, storage, unit.key, owned) == "move":
                unit.add(storage)

    def _movable(self, t: torch.Tensor, storage, key: UnitKey, owned_inputs: set[int]):
        """None: stays. "move": offload and free. "shadow": copy out, keep on the device."""
        if type(t) is not torch.Tensor or t.device.type != self.device_type:
            return None
        if getattr(t, _KEEP_ATTR, False) or not storage.resizable():
            return None
        if storage.nbytes() < self.min_offload_bytes or storage.nbytes() == 0:
            return None
        if t.grad_fn is not None or id(storage) in owned_inputs:
            return "move"
        # No grad_fn: an intermediate of a custom Function, data, a mask -- or a cache.
        sid = id(storage)
        seen = self._first_owner.get(sid)
        if seen is not None and seen[0]() is storage:
            if seen[1] != key:  # shared by two units: a cache
                self._persistent.add(storage)
                for unit in self.units.values():
                    unit.exclude(storage)
                return None
        else:
            self._first_owner[sid] = (weakref.ref(storage), key)
        return "move" if self.iteration > 0 else "shadow"

    def release(self, key: UnitKey) -> UnitActivations:
        """The unit's backward finished: forget it (its storages are autograd's to free)."""
        return self.units.pop(key)
