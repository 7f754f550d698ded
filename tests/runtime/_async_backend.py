"""A fake asynchronous transfer backend: GPU copy timing on a CPU, for the runtime's tests.

Copies complete ``delay_ops`` op boundaries (``poll()`` calls) after they are enqueued, in
enqueue order, as they would on CUDA streams while the host runs ahead of the device:

- a device -> host copy reads its source when it completes. ``release_sources`` frees the
  storage at once, as ``record_stream`` + ``resize_(0)`` does on CUDA; the bytes then live in a
  block the "allocator" holds until the copy completed (``held_bytes``);
- a host buffer holds a poison pattern until its copy completed, and a regrown storage holds
  poison until its host -> device copy completed, so compute that reads either too early
  gives wrong numbers instead of passing by luck;
- ``order_compute_after`` / ``wait_host`` complete the copy (and every copy before it) at
  once and count a stall, the way compute waits on a CUDA event.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_offload.runtime.transfer import Transfer, byte_view

POISON = 0xA5


@dataclass(eq=False)
class FakeEvent:
    seq: int
    done_at: int
    actions: list = field(default_factory=list)
    completed: bool = False


class FakeAsyncBackend:
    name = "fake-async"
    pin_memory = False
    asynchronous = True

    def __init__(self, delay_ops: int = 2) -> None:
        self.delay_ops = delay_ops
        self.clock = 0
        self._seq = 0
        self._pending: list[FakeEvent] = []
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self.stalls = 0

    # ------------------------------------------------------------------- enqueue
    def _enqueue(self, actions, nbytes: int, after: Transfer | None = None) -> Transfer:
        done_at = self.clock + self.delay_ops
        if after is not None and not after.event.completed:
            done_at = max(done_at, after.event.done_at + self.delay_ops)
        self._seq += 1
        event = FakeEvent(self._seq, done_at, actions)
        self._pending.append(event)
        if self.delay_ops == 0:
            self._complete_through(event)
        return Transfer(event=event, nbytes=nbytes)

    def device_to_host(self, pairs):
        sources = []
        actions = []
        for storage, host in pairs:
            host.fill_(POISON)
            source = {"storage": storage, "block": None}
            sources.append(source)

            def copy(source=source, host=host):
                block = source["block"]
                host.copy_(block if block is not None else byte_view(source["storage"]))
                if block is not None:
                    self.held_bytes -= block.numel()
                    source["block"] = None

            actions.append(copy)
        transfer = self._enqueue(actions, sum(h.numel() for _, h in pairs))
        transfer.event.sources = sources
        return transfer

    def release_sources(self, transfer, storages):
        event = transfer.event
        by_id = {id(s["storage"]): s for s in getattr(event, "sources", [])}
        for storage in storages:
            source = by_id.get(id(storage))
            if source is not None and not event.completed:
                # The allocator keeps the block until the copy stream has read it.
                source["block"] = byte_view(storage).clone()
                self.held_bytes += source["block"].numel()
                self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
            storage.resize_(0)

    def host_to_device(self, pairs, after=None):
        actions = []
        for storage, host in pairs:
            byte_view(storage).fill_(POISON)

            def copy(storage=storage, host=host):
                byte_view(storage).copy_(host)

            actions.append(copy)
        return self._enqueue(actions, sum(h.numel() for _, h in pairs), after)

    # ------------------------------------------------------------------ progress
    def _complete_through(self, event: FakeEvent) -> None:
        for pending in sorted(self._pending, key=lambda e: (e.done_at, e.seq)):
            if pending.completed:
                continue
            if (pending.done_at, pending.seq) > (event.done_at, event.seq):
                break
            for action in pending.actions:
                action()
            pending.completed = True
        self._pending = [e for e in self._pending if not e.completed]

    def poll(self) -> None:
        self.clock += 1
        due = [e for e in self._pending if e.done_at <= self.clock]
        if due:
            self._complete_through(max(due, key=lambda e: (e.done_at, e.seq)))

    def is_done(self, transfer: Transfer) -> bool:
        return transfer.event.completed

    def wait_host(self, transfer: Transfer) -> None:
        if not transfer.event.completed:
            self.stalls += 1
            self._complete_through(transfer.event)

    order_compute_after = wait_host

    def in_flight(self) -> int:
        return len(self._pending)
