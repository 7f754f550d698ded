"""The true peak of live activation bytes, sampled after every aten op (CPU or GPU).

``TruePeakMeter`` is a ``TorchDispatchMode``: while it is entered and *recording*, every
storage that an aten op returns and that the meter has not seen is tracked through a weak
reference (``torch.multiprocessing.reductions.StorageWeakRef``), unless it is excluded
(parameters, gradient buffers: ``exclude(tensors)``) or was created inside ``untracked()``
(host copies of an offloading mechanism; ``add_host`` counts those separately). After every
op the meter sums the *current* ``nbytes()`` of the tracked storages that are still alive
(a storage resized to 0 by an offloader counts 0; one resized back counts again) and keeps
the maximum: ``peak_bytes``. ``sample_boundary()`` takes the same sum at a point the caller
chooses (e.g. before and after each ``forward_step`` / ``backward_step``) and keeps
``boundary_peak_bytes``: the value a step-boundary measurement would report, which misses
transients inside a step (an op's workspace, a layer's intermediate that dies before the
step ends).

Usage::

    meter = TruePeakMeter()
    meter.exclude(model.parameters())
    with meter:
        meter.start()            # record storages created from now on
        ... forward / backward ...
        meter.stop()
    meter.peak_bytes, meter.boundary_peak_bytes, meter.host_peak_bytes

The per-op cost is a walk over the live tracked storages (about 0.3 us each): fine for the
tiny models of the CPU benchmarks, not meant for production runs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_key(storage: torch.UntypedStorage) -> int:
    return StorageWeakRef(storage).cdata


class TruePeakMeter(TorchDispatchMode):
    """Tracks storages created while recording; samples their live bytes after every op."""

    def __init__(self) -> None:
        super().__init__()
        self._tracked: dict[int, StorageWeakRef] = {}
        self._excluded: dict[int, StorageWeakRef] = {}
        self._host: dict[int, StorageWeakRef] = {}
        self._untracked_depth = 0
        self.recording = False
        self.peak_bytes = 0
        self.boundary_peak_bytes = 0
        self.host_peak_bytes = 0
        self.ops = 0
        self.samples = 0
        self.segments: list[tuple[str, int, int, int]] = []
        """With :meth:`mark`: (label, live bytes at its start, peak inside, live bytes at
        its end) per segment, in order."""
        self._segment: list | None = None  # [label, start, peak]

    # ------------------------------------------------------------------------ configuration
    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Never count these tensors' storages (parameters, ``main_grad`` buffers, ...)."""
        for t in tensors:
            if t is None:
                continue
            s = t.untyped_storage()
            key = _storage_key(s)
            self._excluded[key] = StorageWeakRef(s)
            self._tracked.pop(key, None)

    def add_host(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage as a host copy (never as live activation bytes)."""
        s = tensor.untyped_storage()
        key = _storage_key(s)
        self._tracked.pop(key, None)
        self._excluded[key] = StorageWeakRef(s)
        self._host[key] = StorageWeakRef(s)

    @contextmanager
    def untracked(self):
        """Storages created inside are not tracked (an offloader's host copies)."""
        self._untracked_depth += 1
        try:
            yield
        finally:
            self._untracked_depth -= 1

    def start(self) -> None:
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def reset_peaks(self) -> None:
        self.peak_bytes = self.boundary_peak_bytes = self.host_peak_bytes = 0
        self.ops = self.samples = 0

    # ------------------------------------------------------------------------------ sums
    @staticmethod
    def _live_sum(refs: dict[int, StorageWeakRef]) -> int:
        total = 0
        dead = []
        for key, ref in refs.items():
            if ref.expired():
                dead.append(key)
                continue
            total += torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
        for key in dead:
            del refs[key]
        return total

    def live_bytes(self) -> int:
        """Current bytes of the tracked storages still alive."""
        return self._live_sum(self._tracked)

    def host_bytes(self) -> int:
        return self._live_sum(self._host)

    def _sample(self) -> int:
        live = self.live_bytes()
        if live > self.peak_bytes:
            self.peak_bytes = live
        if self._segment is not None and live > self._segment[2]:
            self._segment[2] = live
        if self._host:
            host = self.host_bytes()
            if host > self.host_peak_bytes:
                self.host_peak_bytes = host
        return live

    def mark(self, label: str | None) -> None:
        """End the current segment (if any) and start one called ``label`` (None: none)."""
        live = self.live_bytes()
        if self._segment is not None:
            name, start, peak = self._segment
            self.segments.append((name, start, max(peak, live), live))
        self._segment = None if label is None else [label, live, live]

    def sample_boundary(self) -> int:
        """Sample now as a step-boundary measurement would; returns the live bytes."""
        live = self._sample()
        self.samples += 1
        if live > self.boundary_peak_bytes:
            self.boundary_peak_bytes = live
        return live

    # -------------------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.recording:
            self.ops += 1
            if self._untracked_depth == 0:
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        self._maybe_track(t)
            self._sample()
        return out

    def _maybe_track(self, t: torch.Tensor) -> None:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage
            return
        key = _storage_key(s)
        if key in self._tracked or key in self._excluded:
            ref = self._tracked.get(key) or self._excluded.get(key)
            if not ref.expired():
                return
            # the key belonged to a storage that died: the new storage reuses its address
            self._tracked.pop(key, None)
            self._excluded.pop(key, None)
            self._host.pop(key, None)
        self._tracked[key] = StorageWeakRef(s)


def mib(nbytes: int) -> float:
    return nbytes / 2**20


__all__ = ["TruePeakMeter", "mib"]
