"""How bytes move between device and host: a reusable host buffer pool and two backends.

Mechanism only: this module never decides what to offload or when (see ``policy.py`` and
``offloader.py``); host buffers come from ``host_pool.py``. Both backends move whole storages
(``torch.UntypedStorage``) so that every view of a storage travels once and comes back in place.

- :class:`CudaTransferBackend`: one D2H and one H2D stream (full duplex), CUDA events order
  copies against the compute stream, host buffers are pinned (``host_pool.py``), and a source
  is freed as soon as its copy is enqueued (``record_stream``).
- :class:`CpuTransferBackend`: the same contract with synchronous copies into a separate host
  pool. Used on machines without a GPU so that everything but the overlap is exercised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


def byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


@dataclass(slots=True)
class Transfer:
    """A batch of copies in flight; ``event`` is None when the copies already completed."""

    event: object | None
    nbytes: int


class TransferBackend(Protocol):
    name: str
    pin_memory: bool
    asynchronous: bool
    """Copies overlap compute (reloads then start ahead of need); False: each copy is done
    when its call returns."""

    def device_to_host(self, pairs: list[tuple[torch.UntypedStorage, torch.Tensor]]) -> Transfer:
        """Copy each device storage into its host buffer, ordered after the compute issued so
        far."""

    def release_sources(self, transfer: Transfer, storages: list[torch.UntypedStorage]) -> None:
        """Free the device bytes of ``storages`` now, although ``transfer`` may still read them:
        the memory must not be reused before the copy has read it."""

    def host_to_device(
        self, pairs: list[tuple[torch.UntypedStorage, torch.Tensor]], after: Transfer | None
    ) -> Transfer:
        """Copy each host buffer back into its (already regrown) device storage, once
        ``after`` (the copy that filled the host buffers) has finished."""

    def poll(self) -> None:
        """Called at every op boundary (a fake asynchronous backend advances its clock)."""

    def is_done(self, transfer: Transfer) -> bool:
        """True when the copies finished (non-blocking)."""

    def wait_host(self, transfer: Transfer) -> None:
        """Block the calling thread until the copies finished."""

    def order_compute_after(self, transfer: Transfer) -> None:
        """Make compute issued from now on wait for the copies (no host blocking on GPU)."""


class CpuTransferBackend:
    """Synchronous copies between two separate host allocations.

    On a CPU-only machine "device" memory and host memory are the same RAM, but the bytes still
    leave the source storage (which is then freed) and live in the pool until reloaded, so the
    measured saving is real.
    """

    name = "cpu"
    pin_memory = False
    asynchronous = False

    def device_to_host(self, pairs):
        nbytes = 0
        for storage, host in pairs:
            host.copy_(byte_view(storage))
            nbytes += host.numel()
        return Transfer(event=None, nbytes=nbytes)

    def release_sources(self, transfer, storages):
        for storage in storages:
            storage.resize_(0)

    def host_to_device(self, pairs, after=None):
        nbytes = 0
        for storage, host in pairs:
            byte_view(storage).copy_(host)
            nbytes += host.numel()
        return Transfer(event=None, nbytes=nbytes)

    def poll(self) -> None:
        return None

    def is_done(self, transfer: Transfer) -> bool:
        return True

    def wait_host(self, transfer: Transfer) -> None:
        return None

    def order_compute_after(self, transfer: Transfer) -> None:
        return None


class CudaTransferBackend:
    """D2H and H2D on their own streams, so both directions run at once and overlap compute."""

    name = "cuda"
    pin_memory = True
    asynchronous = True

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.d2h_stream = torch.cuda.Stream(device=self.device)
        self.h2d_stream = torch.cuda.Stream(device=self.device)

    def _copy_on(self, stream, pairs, to_host: bool, after: Transfer | None = None) -> Transfer:
        # The copy must see everything compute has produced (D2H) or allocated (H2D) so far,
        # and a reload must not read a host buffer its offload is still writing.
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        stream.wait_event(ready)
        if after is not None and after.event is not None:
            stream.wait_event(after.event)
        nbytes = 0
        with torch.cuda.stream(stream):
            for storage, host in pairs:
                if to_host:
                    host.copy_(byte_view(storage), non_blocking=True)
                else:
                    byte_view(storage).copy_(host, non_blocking=True)
                nbytes += host.numel()
        done = torch.cuda.Event()
        done.record(stream)
        return Transfer(event=done, nbytes=nbytes)

    def device_to_host(self, pairs):
        return self._copy_on(self.d2h_stream, pairs, to_host=True)

    def release_sources(self, transfer, storages):
        # The caching allocator keeps a freed block that another stream used until that
        # stream's queued work has passed it: free at once, reuse only after the copy.
        for storage in storages:
            byte_view(storage).record_stream(self.d2h_stream)
            storage.resize_(0)

    def host_to_device(self, pairs, after=None):
        return self._copy_on(self.h2d_stream, pairs, to_host=False, after=after)

    def poll(self) -> None:
        return None

    def is_done(self, transfer: Transfer) -> bool:
        return transfer.event is None or transfer.event.query()

    def wait_host(self, transfer: Transfer) -> None:
        if transfer.event is not None:
            transfer.event.synchronize()

    def order_compute_after(self, transfer: Transfer) -> None:
        if transfer.event is not None:
            torch.cuda.current_stream(self.device).wait_event(transfer.event)


def make_backend(name: str, device: torch.device | None = None) -> TransferBackend:
    """``auto`` picks cuda when the compute device is a GPU, cpu otherwise."""
    if name == "auto":
        name = "cuda" if device is not None and device.type == "cuda" else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "--offload-backend cuda needs a CUDA device, and torch sees none; use "
                "--offload-backend cpu (or auto)"
            )
        return CudaTransferBackend(device if device is not None and device.type == "cuda" else None)
    return CpuTransferBackend()
