"""The offload runtime of one rank: follows a runtime list, moves (sub-)units, measures memory.

``ActivationOffloader`` is driven by whoever runs the pipeline (the patched Megatron
schedules, the project's executor) through :meth:`run_forward` / :meth:`run_backward` per
step and, with layer streaming, the transformer-layer hooks (``layer_forward_starts`` /
``layer_forward_ends``, and a gradient hook on each layer's output for its backward). Each
iteration follows a runtime list (``begin_iteration(plan=...)``: ``policy.runtime_plan``,
the same IR the simulator scores) entry for entry:

- a compute entry (a step, or a layer's forward/backward) first issues the reloads the list
  puts before it, then checks it is the next entry; a mismatch raises;
- after a forward entry, the offloads the list puts after it: the sub-unit's storages decided
  so far are copied device -> host and their device bytes released at once (the allocator
  reuses them only after the copy read them); storages decided later (a layer's input, once
  the next layer has taken over) follow as soon as they are decided;
- before a backward entry its sub-unit must be back (compute waits only for its own copy);
  once back, the runtime holds no reference to its storages, so autograd frees each as soon
  as the last node that saved it has run.

A unit counted as offloaded was freed: there is no "copy started but kept" state. After a
fault, :meth:`abort` copies every offloaded unit back before forgetting it, so tensors the
caller still holds (a batch kept for a retry, the received inputs) keep their bytes.

A step that does not match the expected order raises: a prefetch that silently missed would
turn an overlapped copy into a stall, or worse, a use of freed memory.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.runtime.accounting import IterationStats, ResidentStorageTracker
from megatron_offload.runtime.host_pool import HostBufferPool
from megatron_offload.runtime.store import (
    ActivationStore,
    SubUnitStorages,
    UnitActivations,
    UnitState,
    preserve_saved_parameters,
)
from megatron_offload.runtime.transfer import TransferBackend
from megatron_offload.schedule.ir import LayerKey, Op, UnitKey
from megatron_offload.schedule.kinds import COMPUTE_KINDS, OpKind
from megatron_offload.schedule.layers import runtime_rank_ops, streamed_sub_units

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
    def __init__(
        self,
        config: OffloadConfig,
        backend: TransferBackend,
        *,
        device_type: str,
        rank_label: str = "",
        pool: HostBufferPool | None = None,
    ) -> None:
        """``backend`` moves the bytes; ``pool`` holds them on the host (None: the pool the
        backend needs within ``config.host_budget_bytes``, ``HostBufferPool.for_offload``)."""
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
        self.pool = pool if pool is not None else HostBufferPool.for_offload(
            pin=backend.pin_memory, budget_bytes=config.host_budget_bytes)
        # The most recent iterations only: a long run must not grow host memory with stats.
        self.iteration_stats: deque[IterationStats] = deque(maxlen=STATS_HISTORY)
        self.iterations_done = 0
        self._order: list[Op] = []
        self._plan: list[Op] = []
        self._streams: dict[UnitKey, set] = {}
        self._cursor = 0
        self._computes = 0
        self._layered = False
        self._capturing: UnitActivations | None = None
        self._position = 0
        self._in_iteration = False
        # Megatron's backward_step gets the output tensor, not the microbatch: map it back.
        self._outputs: dict[int, tuple[weakref.ref, UnitKey]] = {}
        self._output_of_unit: dict[UnitKey, int] = {}
        self._parameter_identity = None
        self._host_releases: list[tuple[Any, list[torch.Tensor]]] = []
        self._stats: IterationStats | None = None
        self.entry_listener: Callable[[Op], None] | None = None
        """Called with each compute entry as it starts, after its reloads (measuring tools
        use it to cut the iteration into the entries the simulator replays)."""

    def register_model(self, modules) -> None:
        """Parameters and buffers outlive every unit: their storages never move."""
        for module in modules:
            # Called unbound: Megatron's DistributedDataParallel shadows .buffers with a list.
            self.store.add_persistent(torch.nn.Module.parameters(module))
            self.store.add_persistent(torch.nn.Module.buffers(module))

    # ----------------------------------------------------------------------- iteration
    def begin_iteration(
        self, order: Sequence[Op], offload_units: set[UnitKey], *,
        plan: Sequence[Op] | None = None,
    ) -> None:
        """Start one iteration. ``order``: this rank's compute ops (F/B); ``plan``: the runtime
        list to follow entry for entry, copies included (unit-level ops, or layer-level entries:
        ops with a layer); None: unit granularity, ``offload_units`` offloaded after their
        forward and reloaded ``prefetch_distance`` ops before their backward."""
        if self._in_iteration:
            raise RuntimeError("begin_iteration called twice without end_iteration/abort")
        self._order = [op for op in order if op.kind in COMPUTE_KINDS]
        if plan is None:
            plan = runtime_rank_ops(
                self._order, set(offload_units), self.config.unit_prefetch_distance
            )
        self._plan = list(plan)
        compute = [(e.kind, e.unit) for e in self._plan if e.is_compute and e.layer is None]
        if compute != [(op.kind, op.unit) for op in self._order]:
            raise ScheduleMismatchError(
                f"{self.rank_label}the runtime list's unit ops differ from the rank's order")
        self._streams = streamed_sub_units(self._plan)
        self._layered = any(e.layer is not None for e in self._plan)
        self._cursor = 0
        self._computes = 0
        self._position = 0
        self._in_iteration = True
        self._parameter_identity = preserve_saved_parameters()
        self._parameter_identity.__enter__()
        self._stats = IterationStats(
            iteration=self.iterations_done,
            rank_order=" ".join(str(op) for op in self._order),
            units=sum(op.kind is OpKind.FORWARD for op in self._order),
        )

    def end_iteration(self) -> IterationStats:
        if self._position != len(self._order) or self._cursor != len(self._plan):
            remaining = " ".join(str(op) for op in self._order[self._position :])
            raise ScheduleMismatchError(
                f"{self.rank_label}the schedule ended after {self._position} of "
                f"{len(self._order)} predicted ops; never ran: {remaining}; runtime list "
                f"stopped at entry {self._cursor} of {len(self._plan)}"
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
                for sub in unit.subunits.values():
                    for buffer in sub.host.values():
                        self.pool.release(buffer)
                    sub.host.clear()
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
        for sub in unit.subunits.values():
            if sub.state is UnitState.OFFLOADED:
                self._reload_bytes(sub)
            if sub.state is UnitState.RELOADING:
                self.backend.wait_host(sub.h2d)
                sub.state = UnitState.RESIDENT
            elif sub.d2h is not None:
                self.backend.wait_host(sub.d2h)

    def _reset_iteration_state(self) -> None:
        self._in_iteration = False
        self._order = []
        self._plan = []
        self._streams = {}
        self._cursor = 0
        self._capturing = None
        self._position = 0
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
        self._enter(Op(OpKind.FORWARD, *key))
        input_tensors = _tensors(list(inputs))
        measuring = self.tracker is not None
        streams = self._streams.get(key, set())
        if streams or measuring or self._layered:  # layer hooks need the unit being captured
            with self.store.capture(key, streams=streams) as unit:
                self._capturing = unit
                try:
                    result = step()
                finally:
                    self._capturing = None
        else:
            unit = None
            result = step()
        outputs = _tensors(result[0] if isinstance(result, tuple) else result)
        if outputs:
            self._outputs[id(outputs[0])] = (weakref.ref(outputs[0]), key)
            self._output_of_unit[key] = id(outputs[0])
        if unit is not None:
            unit.current = None
            self.store.seal(unit, input_tensors, outputs)
            self._send_decided(unit)
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
        self._check_layers_ran(key, OpKind.FORWARD)
        self._offload_due(key, None)
        self._position += 1
        return result

    # Layer boundaries, called by the transformer-layer hooks (integration/layers.py).
    def layer_forward_starts(self, layer: int) -> None:
        unit = self._capturing
        if unit is None or not self._layered or not torch.is_grad_enabled():
            return  # not inside a layer-granular training forward (evaluation, recompute)
        self._enter(Op(OpKind.FORWARD, *unit.key, layer))
        self.store.decide(unit)
        self._send_decided(unit)
        unit.current = layer

    def layer_forward_ends(self, layer: int, output) -> None:
        unit = self._capturing
        if unit is None or not self._layered or not torch.is_grad_enabled():
            return
        if unit.current != layer:
            raise ScheduleMismatchError(
                f"{self.rank_label}layer {layer} of unit {unit.key} ended while layer "
                f"{unit.current} was running (nested or re-entered transformer layers)")
        unit.current = None
        self.store.decide(unit)
        self._send_decided(unit)
        if self.tracker is not None:  # the layer's activations, before they leave
            self._sample(unit.key, OpKind.FORWARD, f"layer {layer} forward end")
        self._offload_due(unit.key, layer)
        first = _tensors(output)
        if first and first[0].requires_grad:
            key = unit.key
            first[0].register_hook(lambda grad: self._layer_backward_starts(key, layer))

    def _layer_backward_starts(self, key: UnitKey, layer: int) -> None:
        if not self._in_iteration:
            return
        self._enter(Op(OpKind.BACKWARD, *key, layer))
        unit = self.store.units.get(key)
        if unit is not None and layer in unit.subunits:
            self._make_resident(unit, unit.subunits[layer])
        if self.tracker is not None:
            self._sample(key, OpKind.BACKWARD, f"layer {layer} backward start")

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
        self._enter(Op(OpKind.BACKWARD, *key))
        unit = self.store.units.get(key)
        if unit is not None and None in unit.subunits:
            self._make_resident(unit, unit.subunits[None])
        if self.tracker is not None:
            self._sample(key, OpKind.BACKWARD, "before_backward")
        result = step()
        self._check_layers_ran(key, OpKind.BACKWARD)
        if unit is not None:
            self.store.release(key)
        self._outputs.pop(self._output_of_unit.pop(key, None), None)
        self._position += 1
        return result

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

    def _check_layers_ran(self, key: UnitKey, kind: OpKind) -> None:
        following = self._plan[self._cursor] if self._cursor < len(self._plan) else None
        if following is not None and following.kind is kind and following.unit == key and (
            following.layer is not None
        ):
            what = kind.word
            raise ScheduleMismatchError(
                f"{self.rank_label}the {what} of unit {key} ended before {following} ran: the "
                f"runtime list has more layers than the hooks reported (a layer not hooked, "
                f"or its {what} hook never fired)")

    def _enter(self, entry: Op) -> None:
        """A compute entry starts: issue the reloads listed before it, check it is next."""
        self._advance()
        plan, cursor = self._plan, self._cursor
        # The reloads listed before it; an offload listed after a reload belongs to a
        # forward that already ended (nothing ran in between): issued here as well.
        while cursor < len(plan) and not plan[cursor].is_compute:
            copy = plan[cursor]
            cursor += 1
            self._cursor = cursor
            self._start_copy(copy)
        expected = plan[cursor] if cursor < len(plan) else None
        if expected != entry:
            lo = max(0, cursor - 4)
            shown = " ".join(
                f"[{e}]" if i == cursor else str(e)
                for i, e in enumerate(plan[lo : cursor + 5], lo)
            )
            raise ScheduleMismatchError(
                f"{self.rank_label}{entry} ran where the runtime list has "
                f"{expected if expected else 'nothing more'} (entry {cursor}): ... {shown} ...")
        self._cursor = cursor + 1
        self._computes += 1
        self._stats.executed_ops.append(str(entry))
        if self.entry_listener is not None:
            self.entry_listener(entry)

    def _offload_due(self, key: UnitKey, layer: LayerKey) -> None:
        """After a forward entry: issue the offloads the runtime list puts right after it."""
        plan = self._plan
        while self._cursor < len(plan):
            entry = plan[self._cursor]
            if entry.kind is not OpKind.OFFLOAD or entry.unit != key or entry.layer != layer:
                break
            self._cursor += 1
            self._start_offload(entry)

    def _start_copy(self, entry: Op) -> None:
        """Issue a copy entry of the runtime list, by its kind."""
        handler = _COPY_HANDLERS.get(entry.kind)
        if handler is None:
            raise ScheduleMismatchError(
                f"{self.rank_label}the offload runtime has no handler for {entry} "
                f"(op kind {entry.kind.name})"
            )
        getattr(self, handler)(entry)

    def _start_offload(self, entry: Op) -> None:
        self._stats.executed_ops.append(str(entry))
        unit = self.store.units.get(entry.unit)
        if unit is None:  # nothing captured (a unit whose forward saved nothing movable)
            return
        if unit.state is UnitState.CAPTURING and entry.layer is None:
            raise ScheduleMismatchError(
                f"{self.rank_label}{entry} is due while unit {entry.unit}'s forward runs")
        sub = unit.sub(entry.layer)
        self._send(unit, sub)
        sub.offloaded_at = (self._computes, time.perf_counter())
        sub.state = UnitState.OFFLOADED
        self._stats.offloaded_subunits += 1
        if entry.layer is None:
            self._stats.offloaded_units += 1

    def _send_decided(self, unit: UnitActivations) -> None:
        """Copy out storages decided after their sub-unit's offload op already ran."""
        for sub in unit.subunits.values():
            if sub.unsent and sub.state is UnitState.OFFLOADED:
                self._send(unit, sub)

    def _send(self, unit: UnitActivations, sub: SubUnitStorages) -> None:
        if not sub.unsent:
            return
        pairs, storages, hosts = [], [], {}
        try:
            for sid in sub.unsent:
                hosts[sid] = self.pool.acquire(sub.sizes[sid])
        except BaseException:  # e.g. over the host budget: nothing moved, nothing held
            for buffer in hosts.values():
                self.pool.release(buffer)
            raise
        for sid, host in hosts.items():
            storage = sub.movable[sid]
            sub.host[sid] = host
            pairs.append((storage, host))
            storages.append(storage)
        sub.unsent.clear()
        self._stats.host_peak_bytes = max(self._stats.host_peak_bytes, self.pool.in_use_bytes)
        sub.d2h = self.backend.device_to_host(pairs)
        self.backend.release_sources(sub.d2h, storages)
        self._stats.offloaded_bytes += sub.d2h.nbytes

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

    def _start_reload(self, entry: Op) -> None:
        self._stats.executed_ops.append(str(entry))
        unit = self.store.units.get(entry.unit)
        sub = None if unit is None else unit.subunits.get(entry.layer)
        if sub is None or sub.state is not UnitState.OFFLOADED:
            return
        self._reload_bytes(sub)
        self._host_releases.append((sub.h2d, list(sub.host.values())))
        sub.host.clear()
        self._stats.reloaded_bytes += sub.h2d.nbytes
        computes, since = sub.offloaded_at
        self._stats.copies.append(
            (_sub_unit_text(entry), sub.h2d.nbytes, self._computes - computes,
             time.perf_counter() - since)
        )

    def _reload_bytes(self, sub: SubUnitStorages) -> None:
        pairs = []
        for sid, storage in sub.movable.items():
            if sid not in sub.host:  # never copied out (a fault before its copy)
                continue
            storage.resize_(sub.sizes[sid])
            pairs.append((storage, sub.host[sid]))
        # The copy back waits for the copy out (still in flight when the lifespan is short).
        sub.h2d = self.backend.host_to_device(pairs, after=sub.d2h)
        sub.d2h = None
        sub.state = UnitState.RELOADING

    def _make_resident(self, unit: UnitActivations, sub: SubUnitStorages) -> None:
        if sub.state is UnitState.OFFLOADED:
            raise ScheduleMismatchError(
                f"{self.rank_label}sub-unit {sub.layer} is needed but the runtime list issued "
                "no reload for it")
        if sub.state is UnitState.RELOADING:
            self.backend.order_compute_after(sub.h2d)
            sub.h2d = None
            sub.state = UnitState.RESIDENT
            # Back for good: let autograd free each storage as soon as the last node saving
            # it has run, not when the whole unit's backward ends.
            for sid in sub.movable:
                unit.location.pop(sid, None)
            sub.forget_storages()

    def _drain(self) -> None:
        for transfer, _ in self._host_releases:
            self.backend.wait_host(transfer)
        self._advance()

    @staticmethod
    def _unit_bytes(unit, inputs, outputs) -> int:
        """Bytes the unit keeps until its backward: saved storages plus the received input,
        not the output (Megatron's send buffer, released once sent). Storages already
        streamed out count with the size they had."""
        storages = {} if unit is None else {sid: ref() for sid, ref in unit.kept.items()}
        for t in inputs:
            storages[id(t.untyped_storage())] = t.untyped_storage()
        for t in outputs:
            storages.pop(id(t.untyped_storage()), None)
        total = 0
        for sid, storage in storages.items():
            if storage is None:
                continue
            sub = None if unit is None else unit.where(sid)
            total += sub.sizes[sid] if sub is not None else storage.nbytes()
        return total

    def _sample(self, key: UnitKey, kind: OpKind, where: str) -> int:
        resident = self.tracker.resident_bytes()
        outputs = self.output_tracker.resident_bytes()
        stats = self._stats
        stats.peak_resident_bytes = max(stats.peak_resident_bytes, resident)
        stats.peak_saved_bytes = max(stats.peak_saved_bytes, resident - outputs)
        stats.samples.append((str(Op(kind, *key)), where, resident, outputs))
        return resident


_COPY_HANDLERS = {
    OpKind.OFFLOAD: "_start_offload",
    OpKind.RELOAD: "_start_reload",
}
"""The method issuing each copy kind of the runtime list (compute entries are the caller's
steps and the layer hooks)."""


def _sub_unit_text(entry: Op) -> str:
    """'c,m' for a unit's rest, 'c,m.l' for layer l."""
    text = f"{entry.chunk},{entry.microbatch}"
    return text if entry.layer is None else f"{text}.{entry.layer}"


@contextlib.contextmanager
def iteration(offloader: ActivationOffloader, order: Sequence[Op], offload_units: set[UnitKey],
              *, plan: Sequence | None = None):
    """begin/end an iteration; abort (hold nothing) if the body raises."""
    offloader.begin_iteration(order, offload_units, plan=plan)
    try:
        yield offloader
        offloader.end_iteration()  # its own checks failing abort too
    except BaseException:
        offloader.abort()
        raise
