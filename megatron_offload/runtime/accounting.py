"""Per-rank, per-iteration accounting of activation memory, measured rather than assumed.

:class:`ResidentStorageTracker` counts what is really still allocated: it holds weak
references to every storage a unit produced or kept (saved tensors, the received input, the
chunk output) and sums ``nbytes()`` of those still alive. A storage that our offload freed has
``nbytes() == 0``; one freed by Megatron (``deallocate_pipeline_outputs``) or by autograd after
backward has a dead weak reference. A copy whose source is still referenced elsewhere therefore
shows up as still resident, which is the point.
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field

import torch


class StorageWeakSet:
    """Storages by identity, held weakly: an entry drops itself when its storage is freed."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._refs and self._refs[key]() is storage:
            return

        def _forget(_ref, key=key, refs=self._refs):
            if refs.get(key) is _ref:
                del refs[key]

        self._refs[key] = weakref.ref(storage, _forget)

    def __contains__(self, storage) -> bool:
        ref = self._refs.get(id(storage))
        return ref is not None and ref() is storage

    def alive(self):
        for ref in list(self._refs.values()):
            storage = ref()
            if storage is not None:
                yield storage

    def __len__(self) -> int:
        return len(self._refs)

    def clear(self) -> None:
        self._refs.clear()


class ResidentStorageTracker(StorageWeakSet):
    """The storages a rank's units produced or kept; what they still hold is what is resident."""

    track = StorageWeakSet.add

    def resident_bytes(self) -> int:
        return sum(storage.nbytes() for storage in self.alive())


@dataclass(slots=True)
class IterationStats:
    """What one rank measured in one training iteration (one forward_backward call)."""

    iteration: int
    rank_order: str = ""
    """The per-rank op order the runtime expected (and checked), as text, e.g. '0F0 0F1 0B0'."""
    executed_ops: list = field(default_factory=list)
    """Every op as issued, offloads ('0O3') and reloads ('0R3') included, in order."""
    peak_resident_bytes: int = 0
    """Peak over step boundaries (and, at layer granularity, layer boundaries: a layer's
    forward end before its activations leave, its backward start once they are back) of
    activation bytes really resident on the device: saved tensors, received inputs and chunk
    outputs (requires ``measure_memory``; 0 otherwise). Transients inside an op are not
    counted (``testing.true_peak.TruePeakMeter`` measures those)."""
    peak_saved_bytes: int = 0
    """The same peak without chunk outputs: outputs are Megatron's send buffers, alive until
    their (asynchronous) send completes, whatever the offload policy."""
    offloaded_bytes: int = 0
    """Bytes copied device -> host in this iteration."""
    reloaded_bytes: int = 0
    """Bytes copied host -> device in this iteration."""
    host_pool_bytes: int = 0
    """Capacity of the host buffer pool at the end of the iteration."""
    host_pool_buffers: int = 0
    host_pinned_bytes: int = 0
    """Bytes the pool really pinned at the end of the iteration (0 on the CPU backend)."""
    host_peak_bytes: int = 0
    """Most host bytes holding offloaded activations at once in this iteration (the need)."""
    offloaded_units: int = 0
    """Units whose rest (everything outside the transformer layers) left the device."""
    offloaded_subunits: int = 0
    """Offload entries issued: one per streamed layer, one per unit rest."""
    copies: list = field(default_factory=list)
    """One (sub-unit 'c,m' or 'c,m.l', bytes, compute entries run while it was away,
    seconds away) per round trip, at its reload: what each copy freed, for how long."""
    units: int = 0
    kept_shared_storages: int = 0
    """Saved storages that stayed because something besides the unit's saved tensors
    referenced them when its forward returned (caches: autocast casts, rotary tables)."""
    kept_released_storages: int = 0
    """Saved storages that stayed because their owner had already released them (0 bytes:
    Megatron's CheckpointWithoutOutput, recomputed before the backward)."""
    unit_bytes: dict = field(default_factory=dict)
    """Bytes each unit kept resident right after its forward, keyed 'chunk,microbatch'
    (requires ``measure_memory``)."""
    samples: list = field(default_factory=list)
    """(op text, 'after_forward'|'before_backward'|'layer L forward end'|'layer L backward
    start', resident bytes, of which chunk-output bytes) at each sampling point (requires
    ``measure_memory``)."""

    def as_dict(self) -> dict:
        return asdict(self)
