"""The offload runtime of one rank: follows a known op order, moves units, measures memory.

``ActivationOffloader`` is driven one step at a time by whoever runs the pipeline (the patched
Megatron schedules today, the project's own executor later):

- :meth:`run_forward` checks that the step is the next op of the expected order, starts the
  reload of the next backward's unit (one op ahead, so the copy overlaps this op), runs the
  forward under saved-tensor hooks, then starts the unit's device -> host copy and releases
  the unit's device bytes at once (the allocator reuses them only after the copy read them);
- :meth:`run_backward` makes sure the unit is back (compute waits only for its own copy),
  prefetches the next one, runs the backward and forgets the unit.

A unit counted as offloaded was freed: there is no "copy started but kept" state. After a
fault, :meth:`abort` copies every offloaded unit back before forgetting it, so tensors the
caller still holds (a batch kept for a retry, the received inputs) keep their bytes.

A step that does not match the expected order raises: a prefetch that silently missed would
turn an overlapped copy into a stall, or worse, a use of freed memory.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.runtime.accounting import IterationStats, ResidentStorageTracker
from megatron_offload.runtime.store import (
    ActivationStore,
    UnitActivations,
    UnitKey,
    UnitState,
    preserve_saved_parameters,
)
from megatron_offload.runtime.host_pool import (
    CudaHostRegisterPinner,
    HostBufferPool,
    default_host_budget_bytes,
)
from megatron_offload.runtime.transfer import TransferBackend
from megatron_offload.schedule.ir import Op, OpKind


STATS_HISTORY = 64


class ScheduleMismatchError(RuntimeError):
    """Megatron ran a step the predicted per-rank order did not contain at that position."""


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for t in obj if isinstance(t, torch.Tensor)]
    return []


class ActivationOffloader:
    planned_copies = False
    """False: the offloader decides when copies run (offload right after a unit's forward,
    reload --offload-prefetch ops ahead). True: only :meth:`offload` / :meth:`reload` start
    copies, at the positions a planned schedule gives (``runtime/executor.py``, which refuses
    to run the backward of a unit still offloaded: a plan without its R)."""

    def __init__(
        self,
        config: OffloadConfig,
        backend: TransferBackend,
        *,
        device_type: str,
        rank_label: str = "",
    ) -> None:
        self.config = config
        self.backend = backend
        self.rank_label = rank_label
        self.tracker = ResidentStorageTracker() if config.measure_memory else None
        self.output_tracker = ResidentStorageTracker() if config.measure_memory else None
        self.store = ActivationStore(
            min_offload_bytes=config.min_offload_bytes,
            device_type=device_type,
            tracker=self.tracker,
        )
        budget = config.host_budget_bytes
        self.pool = HostBufferPool(
            pinner=CudaHostRegisterPinner() if backend.pin_memory else None,
            budget_bytes=default_host_budget_bytes() if budget is None else budget,
        )
        # The most recent iterations only: a long run must not grow host memory with stats.
        self.iteration_stats: deque[IterationStats] = deque(maxlen=STATS_HISTORY)
        self.iterations_done = 0
        self._order: list[Op] = []
        self._position = 0
        self._offload_units: set[UnitKey] = set()
        self._in_iteration = False
        # Megatron's backward_step gets the output tensor, not the microbatch: map it back.
        self._outputs: dict[int, tuple[weakref.ref, UnitKey]] = {}
        self._output_of_unit: dict[UnitKey, int] = {}
        self._parameter_identity = None
        self._host_releases: list[tuple[Any, list[torch.Tensor]]] = []
        self._stats: IterationStats | None = None

    def register_model(self, modules) -> None:
        """Parameters and buffers outlive every unit: their storages never move."""
        for module in modules:
            # Called unbound: Megatron's DistributedDataParallel shadows .buffers with a list.
            self.store.add_persistent(torch.nn.Module.parameters(module))
            self.store.add_persistent(torch.nn.Module.buffers(module))

    # ----------------------------------------------------------------------- iteration
    def begin_iteration(self, order: Sequence[Op], offload_units: set[UnitKey]) -> None:
        if self._in_iteration:
            raise RuntimeError("begin_iteration called twice without end_iteration/abort")
        self._order = [op for op in order if op.kind in (OpKind.FORWARD, OpKind.BACKWARD)]
        self._position = 0
        self._offload_units = set(offload_units)
        self._in_iteration = True
        self._parameter_identity = preserve_saved_parameters()
        self._parameter_identity.__enter__()
        self._stats = IterationStats(
            iteration=self.iterations_done,
            rank_order=" ".join(str(op) for op in self._order),
            units=sum(op.kind is OpKind.FORWARD for op in self._order),
        )

    def end_iteration(self) -> IterationStats:
        if self._position != len(self._order):
            remaining = " ".join(str(op) for op in self._order[self._position :])
            raise ScheduleMismatchError(
                f"{self.rank_label}the schedule ended after {self._position} of "
                f"{len(self._order)} predicted ops; never ran: {remaining}"
            )
        if self.store.units:
            raise RuntimeError(
                f"{self.rank_label}units without a backward at the end of the iteration: "
                f"{sorted(self.store.units)}"
            )
        self._drain()
        stats = self._stats
        stats.host_pool_bytes = self.pool.capacity_bytes
        stats.host_pool_buffers = self.pool.num_buffers
        stats.host_pinned_bytes = self.pool.pinned_bytes
        self.iteration_stats.append(stats)
        self.iterations_done += 1
        self._reset_iteration_state()
        return stats

    def abort(self) -> None:
        """After an exception mid-iteration: give every offloaded storage its bytes back, wait
        for copies in flight, then hold nothing. Exception-safe: whatever a wait raises (a
        second Ctrl-C, a device error), the state is reset and the first error re-raised."""
        first_error: BaseException | None = None
        try:
            for unit in list(self.store.units.values()):
                try:
                    self._restore(unit)
                except BaseException as error:  # keep restoring the others
                    first_error = first_error or error
            for transfer, _ in self._host_releases:
                try:
                    self.backend.wait_host(transfer)
                except BaseException as error:
                    first_error = first_error or error
        finally:
            for unit in self.store.units.values():
                for buffer in unit.host.values():
                    self.pool.release(buffer)
                unit.host.clear()
            for _, buffers in self._host_releases:
                for buffer in buffers:
                    self.pool.release(buffer)
            self.store.drop_all()
            if self.tracker is not None:
                self.tracker.clear()
                self.output_tracker.clear()
            self._reset_iteration_state()
        if first_error is not None:
            raise first_error

    def _restore(self, unit: UnitActivations) -> None:
        """Synchronously bring an offloaded or reloading unit's bytes back (fault path)."""
        if unit.state is UnitState.OFFLOADED:
            pairs = []
            for sid, storage in unit.movable.items():
                storage.resize_(unit.sizes[sid])
                pairs.append((storage, unit.host[sid]))
            unit.h2d = self.backend.host_to_device(pairs, after=unit.d2h)
            unit.state = UnitState.RELOADING
        if unit.state is UnitState.RELOADING:
            self.backend.wait_host(unit.h2d)
            unit.state = UnitState.RESIDENT
        elif unit.d2h is not None:
            self.backend.wait_host(unit.d2h)

    def _reset_iteration_state(self) -> None:
        self._in_iteration = False
        self._order = []
        self._position = 0
        self._offload_units = set()
        self._outputs.clear()
        self._output_of_unit.clear()
        self._host_releases.clear()
        self._stats = None
        if self._parameter_identity is not None:
            parameter_identity, self._parameter_identity = self._parameter_identity, None
            parameter_identity.__exit__(None, None, None)

    def holds_no_tensors(self) -> bool:
        """True when no activation or host copy is referenced by the runtime (the host pool
        may keep free buffers: it is a cache reused by the next iteration)."""
        return (
            not self.store.units
            and not self._host_releases
            and not self._outputs
            and self.pool.in_use_bytes == 0
        )

    def close(self) -> None:
        """Return the host pool's memory (at uninstall); refuses while an iteration runs."""
        if self._in_iteration:
            raise RuntimeError(f"{self.rank_label}close() during an iteration")
        self.pool.clear()

    # --------------------------------------------------------------------------- steps
    def run_forward(self, key: UnitKey, inputs: Sequence, step: Callable[[], Any]) -> Any:
        """Run one forward step (``step()`` returns Megatron's ``(output, num_tokens)``)."""
        self._expect(OpKind.FORWARD, key)
        self._advance()
        self._prefetch()
        self._stats.executed_ops.append(str(Op(OpKind.FORWARD, *key)))
        input_tensors = _tensors(list(inputs))
        measuring = self.tracker is not None
        offload = key in self._offload_units
        if offload or measuring:
            with self.store.capture(key, offload=offload):
                result = step()
        else:
            result = step()
        outputs = _tensors(result[0] if isinstance(result, tuple) else result)
        if outputs:
            self._outputs[id(outputs[0])] = (weakref.ref(outputs[0]), key)
            self._output_of_unit[key] = id(outputs[0])
        unit = self.store.units.get(key)
        if unit is not None:
            self.store.seal(unit, input_tensors, outputs, offload=offload)
        if measuring:
            for t in input_tensors + outputs:
                self.tracker.track(t.untyped_storage())
            for t in outputs:
                self.output_tracker.track(t.untyped_storage())
            self._sample(key, OpKind.FORWARD, "after_forward")
            self._stats.unit_bytes[f"{key[0]},{key[1]}"] = self._unit_bytes(
                unit, input_tensors, outputs
            )
        if unit is not None:
            self._stats.kept_shared_storages += unit.skipped_shared
            self._stats.kept_released_storages += unit.skipped_released
        if unit is not None and offload and unit.movable and not self.planned_copies:
            self._start_offload(unit)
        self._position += 1
        return result

    def unit_for_output(self, output) -> UnitKey:
        """The unit whose forward returned ``output`` (Megatron's backward gets no microbatch)."""
        first = _tensors(output)
        entry = self._outputs.get(id(first[0])) if first else None
        if entry is None or entry[0]() is not first[0]:
            raise ScheduleMismatchError(
                f"{self.rank_label}backward_step got an output tensor that no forward_step of "
                "this iteration returned"
            )
        return entry[1]

    def run_backward(self, key: UnitKey, step: Callable[[], Any]) -> Any:
        self._expect(OpKind.BACKWARD, key)
        self._advance()
        unit = self.store.units.get(key)
        if unit is not None:
            self._make_resident(unit)
        self._prefetch()
        self._stats.executed_ops.append(str(Op(OpKind.BACKWARD, *key)))
        if self.tracker is not None:
            self._sample(key, OpKind.BACKWARD, "before_backward")
        result = step()
        if unit is not None:
            self.store.release(key)
        self._outputs.pop(self._output_of_unit.pop(key, None), None)
        self._position += 1
        return result

    # ------------------------------------------------- planned copies (the executor's O / R)
    def offload(self, key: UnitKey) -> bool:
        """Start the offload of ``key`` now (an O op of a planned schedule). The unit must have
        run its forward in this iteration under an offload set containing it; returns False
        when it has nothing movable (then nothing moves, and its R is a no-op too)."""
        unit = self.store.units.get(key)
        if unit is None or key not in self._offload_units:
            raise ScheduleMismatchError(
                f"{self.rank_label}O{key} planned, but unit {key} ran no forward under the "
                "offload set of this iteration"
            )
        if unit.state is not UnitState.RESIDENT or not unit.movable:
            return False
        self._advance()
        self._start_offload(unit)
        return True

    def reload(self, key: UnitKey) -> bool:
        """Start the reload of ``key`` now (an R op of a planned schedule); its backward waits
        for the copy. Returns False when the unit was not offloaded (nothing to bring back)."""
        unit = self.store.units.get(key)
        if unit is None or unit.state is not UnitState.OFFLOADED:
            return False
        self._advance()
        self._start_reload(unit)
        return True

    def is_offloaded(self, key: UnitKey) -> bool:
        """True while ``key``'s bytes are off the device (offloaded, reload not started)."""
        unit = self.store.units.get(key)
        return unit is not None and unit.state is UnitState.OFFLOADED

    # ------------------------------------------------------------------------ internals
    def _expect(self, kind: OpKind, key: UnitKey) -> None:
        if not self._in_iteration:
            raise RuntimeError(f"{self.rank_label}a step ran outside begin/end_iteration")
        actual = Op(kind, *key)
        expected = self._order[self._position] if self._position < len(self._order) else None
        if actual != expected:
            shown = " ".join(
                f"[{op}]" if i == self._position else str(op)
                for i, op in enumerate(self._order)
            )
            raise ScheduleMismatchError(
                f"{self.rank_label}Megatron ran {actual} at step {self._position}, the predicted "
                f"order has {expected if expected else 'nothing more'} there: {shown}. The "
                "offload plan would reload the wrong unit; report this with your schedule flags."
            )

    def _start_offload(self, unit: UnitActivations) -> None:
        pairs = []
        for sid, storage in unit.movable.items():
            host = self.pool.acquire(unit.sizes[sid])
            unit.host[sid] = host
            pairs.append((storage, host))
        self._stats.host_peak_bytes = max(self._stats.host_peak_bytes, self.pool.in_use_bytes)
        unit.d2h = self.backend.device_to_host(pairs)
        self.backend.release_sources(unit.d2h, list(unit.movable.values()))
        unit.state = UnitState.OFFLOADED
        self._stats.executed_ops.append(str(Op(OpKind.OFFLOAD, *unit.key)))
        self._stats.offloaded_bytes += unit.d2h.nbytes
        self._stats.offloaded_units += 1

    def _advance(self) -> None:
        """An op boundary: let the backend progress; recycle host buffers no copy reads."""
        self.backend.poll()
        pending = []
        for transfer, buffers in self._host_releases:
            if self.backend.is_done(transfer):
                for buffer in buffers:
                    self.pool.release(buffer)
            else:
                pending.append((transfer, buffers))
        self._host_releases = pending

    def _prefetch(self) -> None:
        if self.planned_copies:
            return
        last = min(len(self._order), self._position + 1 + self.config.prefetch_distance)
        for op in self._order[self._position + 1 : last]:
            if op.kind is OpKind.BACKWARD:
                unit = self.store.units.get(op.unit)
                if unit is not None and unit.state is UnitState.OFFLOADED:
                    self._start_reload(unit)

    def _start_reload(self, unit: UnitActivations) -> None:
        self._stats.executed_ops.append(str(Op(OpKind.RELOAD, *unit.key)))
        pairs = []
        for sid, storage in unit.movable.items():
            storage.resize_(unit.sizes[sid])
            pairs.append((storage, unit.host[sid]))
        # The copy back waits for the copy out (still in flight when the lifespan is short).
        unit.h2d = self.backend.host_to_device(pairs, after=unit.d2h)
        self._host_releases.append((unit.h2d, list(unit.host.values())))
        unit.host.clear()
        unit.d2h = None
        unit.state = UnitState.RELOADING
        self._stats.reloaded_bytes += unit.h2d.nbytes

    def _make_resident(self, unit: UnitActivations) -> None:
        if unit.state is UnitState.OFFLOADED:
            self._start_reload(unit)  # not prefetched (prefetch distance 0 or first op)
        if unit.state is UnitState.RELOADING:
            self.backend.order_compute_after(unit.h2d)
            unit.h2d = None
            unit.state = UnitState.RESIDENT

    def _drain(self) -> None:
        for transfer, _ in self._host_releases:
            self.backend.wait_host(transfer)
        self._advance()

    @staticmethod
    def _unit_bytes(unit, inputs, outputs) -> int:
        """Bytes the unit keeps until its backward: saved storages plus the received input,
        not the output (Megatron's send buffer, released once sent)."""
        storages = {} if unit is None else {sid: ref() for sid, ref in unit.kept.items()}
        for t in inputs:
            storages[id(t.untyped_storage())] = t.untyped_storage()
        for t in outputs:
            storages.pop(id(t.untyped_storage()), None)
        return sum(s.nbytes() for s in storages.values() if s is not None)

    def _sample(self, key: UnitKey, kind: OpKind, where: str) -> int:
        resident = self.tracker.resident_bytes()
        outputs = self.output_tracker.resident_bytes()
        stats = self._stats
        stats.peak_resident_bytes = max(stats.peak_resident_bytes, resident)
        stats.peak_saved_bytes = max(stats.peak_saved_bytes, resident - outputs)
        stats.samples.append((str(Op(kind, *key)), where, resident, outputs))
        return resident


@contextlib.contextmanager
def iteration(offloader: ActivationOffloader, order: Sequence[Op], offload_units: set[UnitKey]):
    """begin/end an iteration; abort (hold nothing) if the body raises."""
    offloader.begin_iteration(order, offload_units)
    try:
        yield offloader
        offloader.end_iteration()  # its own checks failing abort too
    except BaseException:
        offloader.abort()
        raise
