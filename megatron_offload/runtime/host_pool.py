"""Host buffers for offloaded activations: reused across iterations, bounded, and honestly counted.

Three problems of the first pool shape this one:

- It kept one free list per exact 4 KiB size, so every new sequence length or microbatch count
  allocated a new set of buffers and the pool grew without bound. Here sizes are rounded up to
  coarse classes (8 per power of two), any free buffer large enough serves a request (best fit),
  and when the pool must allocate it first frees idle buffers too small to serve the request, as
  long as it holds more than ``slack`` x the most bytes ever in use.
- It pinned through torch's caching host allocator, which rounds every allocation up to a power
  of two (a 1 GiB + 4 KiB buffer pins 2 GiB) and keeps freed blocks cached instead of returning
  them. Here a :class:`Pinner` registers ordinary host memory (``cudaHostRegister``), so the bytes
  pinned are the bytes counted, and unregistering + dropping a buffer hands it back to the CPU
  allocator (glibc unmaps large blocks at once) instead of a pinned-memory cache.
- Nothing checked host RAM. ``budget_bytes`` caps the pool; the allocation that would cross it
  raises :class:`HostBudgetExceeded` before allocating anything.

No Megatron imports: the offloader wires this in.
"""
from __future__ import annotations

import bisect
import os
from typing import Protocol

import torch

#: Smallest buffer, and the granularity of every buffer size (one page).
MIN_BUFFER_BYTES = 4096
#: Size classes per power of two: a request is rounded up by at most 1/8 (12.5 %).
CLASSES_PER_OCTAVE = 8

BUDGET_FLAG = "--offload-host-budget-gib"


def size_class(nbytes: int) -> int:
    """``nbytes`` rounded up to its class: a multiple of 4 KiB and of 1/8 of its power of two."""
    if nbytes <= MIN_BUFFER_BYTES:
        return MIN_BUFFER_BYTES
    # For nbytes in (2^k, 2^(k+1)] the classes are 2^k * (1 + i/8), i = 1..8.
    octave = 1 << ((nbytes - 1).bit_length() - 1)  # 2^k
    step = max(MIN_BUFFER_BYTES, octave // CLASSES_PER_OCTAVE)
    return -(-nbytes // step) * step


class HostBudgetExceeded(RuntimeError):
    """The host pool would grow past its budget (raised before anything is allocated)."""

    def __init__(self, requested: int, held: int, budget: int, lent: int) -> None:
        self.requested, self.held, self.budget, self.lent = requested, held, budget, lent
        gib = 1 << 30
        super().__init__(
            f"offloading needs a new {requested} B host buffer ({requested / gib:.3f} GiB), but "
            f"the host pool already holds {held} B ({held / gib:.3f} GiB; {lent} B of it lent out "
            f"to offloaded activations) and its budget "
            f"({BUDGET_FLAG}) is {budget} B ({budget / gib:.3f} GiB). Raise {BUDGET_FLAG} if "
            "the node has the RAM, offload fewer chunks (--offload-policy chunks --offload-chunks "
            "K with a smaller K), or use more pipeline stages so each rank keeps fewer activations."
        )


class Pinner(Protocol):
    """Page-locks host buffers so that copies to and from the device can run asynchronously."""

    def pin(self, buffer: torch.Tensor) -> None:
        """Page-lock all ``buffer.numel()`` bytes of a contiguous uint8 host tensor."""

    def unpin(self, buffer: torch.Tensor) -> None:
        """Undo :meth:`pin` (called before the pool drops the buffer)."""


class CudaHostRegisterPinner:
    """Pins with ``cudaHostRegister`` on memory from the ordinary CPU allocator.

    The driver locks whole pages, so a buffer that does not start on a page boundary locks up to
    one page (4 KiB) more than its size: small next to activation buffers, which are MiBs.
    """

    def __init__(self) -> None:
        self._cudart = torch.cuda.cudart()

    def _check(self, rc, call: str, buffer: torch.Tensor) -> None:
        if rc != self._cudart.cudaError.success:
            raise RuntimeError(
                f"{call}({buffer.data_ptr():#x}, {buffer.numel()} B) failed: "
                f"{self._cudart.cudaGetErrorString(rc)} ({int(rc)}). The host pool cannot pin its "
                f"buffers; check the locked-memory limit (ulimit -l) and free host RAM, or lower "
                f"{BUDGET_FLAG}."
            )

    def pin(self, buffer: torch.Tensor) -> None:
        rc = self._cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
        self._check(rc, "cudaHostRegister", buffer)

    def unpin(self, buffer: torch.Tensor) -> None:
        rc = self._cudart.cudaHostUnregister(buffer.data_ptr())
        self._check(rc, "cudaHostUnregister", buffer)


class HostBufferPool:
    """Host buffers allocated on demand and reused; :meth:`acquire` returns an exact-size view.

    Pinning costs milliseconds per buffer and stalls the device, so steady state must not
    allocate: released buffers stay in the pool and later requests reuse them best-fit. Growth is
    bounded instead by evicting idle buffers that are too small for a new request whenever the
    pool holds more than ``slack`` x ``high_water_bytes``. The buffers in use cannot be evicted,
    so capacity can exceed that bound by what they hold beyond their requests (class rounding, or
    a larger buffer lent by best fit) plus the one buffer being allocated.

    ``in_use_bytes`` and ``high_water_bytes`` count the bytes requested (the real need);
    ``capacity_bytes`` and ``pinned_bytes`` count whole buffers (what the process really holds).
    """

    def __init__(
        self, *, pinner: Pinner | None = None, budget_bytes: int | None = None, slack: float = 1.2
    ) -> None:
        if slack < 1.0:
            raise ValueError(f"slack must be >= 1.0 (a multiple of the peak need), got {slack}")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.pinner = pinner
        self.budget_bytes = budget_bytes
        self.slack = slack
        # Idle buffers sorted by size (two parallel lists so bisect finds the best fit).
        self._free_sizes: list[int] = []
        self._free: list[torch.Tensor] = []
        # Address of a lent buffer -> (buffer, bytes requested). Each buffer is lent once, so the
        # address of a view's storage identifies the loan (a view's own data_ptr would not: it
        # is 0 for an empty view).
        self._in_use: dict[int, tuple[torch.Tensor, int]] = {}
        # Views that clear(force=True) forgot: releasing one later is a no-op, not an error.
        self._forgotten: set[int] = set()
        self.capacity_bytes = 0
        self.pinned_bytes = 0
        self.num_buffers = 0
        self.in_use_bytes = 0
        self.high_water_bytes = 0
        self.allocations = 0
        self.evictions = 0

    @classmethod
    def for_offload(cls, *, pin: bool, budget_bytes: int | None = None) -> "HostBufferPool":
        """The pool of one offloader: pinned with ``cudaHostRegister`` when its backend copies
        from page-locked memory (``pin``: ``TransferBackend.pin_memory``), growing to at most
        ``budget_bytes`` (None: :func:`default_host_budget_bytes`, this rank's share of the
        node)."""
        return cls(
            pinner=CudaHostRegisterPinner() if pin else None,
            budget_bytes=default_host_budget_bytes() if budget_bytes is None else budget_bytes,
        )

    # ------------------------------------------------------------------------------ loans
    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of exactly ``nbytes``: a view into the front of a pooled buffer."""
        if nbytes < 0:
            raise ValueError(f"cannot acquire {nbytes} bytes")
        need = self.in_use_bytes + nbytes
        i = bisect.bisect_left(self._free_sizes, nbytes)
        if i < len(self._free):
            # Best fit: the smallest idle buffer that is large enough, whatever its class.
            self._free_sizes.pop(i)
            buffer = self._free.pop(i)
        else:
            buffer = self._allocate(size_class(nbytes), max(self.high_water_bytes, need))
        self.high_water_bytes = max(self.high_water_bytes, need)
        view = buffer[:nbytes]
        self._in_use[buffer.untyped_storage().data_ptr()] = (buffer, nbytes)
        self.in_use_bytes = need
        return view

    def release(self, view: torch.Tensor) -> None:
        """Give back a view from :meth:`acquire`; its buffer serves later requests."""
        ptr = view.untyped_storage().data_ptr()
        loan = self._in_use.pop(ptr, None)
        if loan is None:
            if ptr in self._forgotten:
                self._forgotten.discard(ptr)
                return
            raise KeyError(f"release of a host view this pool did not lend (address {ptr:#x})")
        buffer, nbytes = loan
        self.in_use_bytes -= nbytes
        self._add_free(buffer)

    def predict_fits(self, nbytes: int) -> bool:
        """Whether ``acquire(nbytes)`` would succeed now without crossing the budget."""
        fits_idle = bisect.bisect_left(self._free_sizes, nbytes) < len(self._free)
        if fits_idle or self.budget_bytes is None:
            return True
        # Every idle buffer is too small, so all of them could be evicted to make room.
        return self.capacity_bytes - sum(self._free_sizes) + size_class(nbytes) <= self.budget_bytes

    # ------------------------------------------------------------------ growth and release
    def _allocate(self, size: int, high_water: int) -> torch.Tensor:
        # Only called when every idle buffer is smaller than the request, so any of them may go.
        budget = self.budget_bytes
        if budget is not None and self.capacity_bytes - sum(self._free_sizes) + size > budget:
            raise HostBudgetExceeded(size, self.capacity_bytes, budget, self._lent_buffer_bytes())
        limit = self.slack * high_water
        # Evict the largest first: fewest buffers unpinned per byte returned; in simulations of
        # changing sequence lengths this also left less capacity than evicting the smallest first.
        while self._free and (
            self.capacity_bytes + size > limit
            or (budget is not None and self.capacity_bytes + size > budget)
        ):
            self._free_sizes.pop()
            self._drop(self._free.pop())
            self.evictions += 1
        buffer = torch.empty(size, dtype=torch.uint8)
        if self.pinner is not None:
            self.pinner.pin(buffer)  # raises before the pool counts the buffer
            self.pinned_bytes += size
        # The address may be one a forgotten view had: it now belongs to this buffer.
        self._forgotten.discard(buffer.untyped_storage().data_ptr())
        self.capacity_bytes += size
        self.num_buffers += 1
        self.allocations += 1
        return buffer

    def _lent_buffer_bytes(self) -> int:
        return sum(buffer.numel() for buffer, _ in self._in_use.values())

    def _add_free(self, buffer: torch.Tensor) -> None:
        i = bisect.bisect_right(self._free_sizes, buffer.numel())
        self._free_sizes.insert(i, buffer.numel())
        self._free.insert(i, buffer)

    def _drop(self, buffer: torch.Tensor) -> None:
        """Unpin and forget a buffer already taken off the free list."""
        # Unpin before the memory goes back to the allocator: a freed but still registered range
        # makes a later cudaHostRegister of the same addresses fail ("already registered").
        if self.pinner is not None:
            try:
                self.pinner.unpin(buffer)
            except BaseException:
                self._add_free(buffer)  # still pinned: keep it (and its memory) on the books
                raise
            self.pinned_bytes -= buffer.numel()
        self.capacity_bytes -= buffer.numel()
        self.num_buffers -= 1

    def clear(self, *, force: bool = False) -> None:
        """Unpin and drop every buffer, returning the memory to the CPU allocator.

        With views still lent this raises (they would be leaked or still being copied), unless
        ``force``: then the pool forgets them too. Use ``force`` only once no copy touches pool
        memory (after waiting for every transfer, as ``abort`` does): a forgotten view stays valid
        as ordinary unpinned memory until its holder drops it, and releasing it later is a no-op.
        ``high_water_bytes`` and ``allocations`` are kept: they describe the run, not the buffers.
        """
        if self._in_use and not force:
            raise RuntimeError(
                f"clear() with {len(self._in_use)} host views ({self.in_use_bytes} B) still lent; "
                "release them first, or pass force=True once no copy uses them"
            )
        # Take every buffer off the books first; one that fails to unpin goes back on the free
        # list (still pinned, still counted) and the first error is raised after all were tried.
        buffers = self._free + [buffer for buffer, _ in self._in_use.values()]
        self._forgotten.update(self._in_use)
        self._free, self._free_sizes, self._in_use = [], [], {}
        self.in_use_bytes = 0
        error = None
        for buffer in buffers:
            try:
                self._drop(buffer)
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    def __del__(self) -> None:
        # A pool dropped without clear() must not leave registered ranges behind (see _drop).
        if getattr(self, "pinner", None) is not None and getattr(self, "num_buffers", 0):
            try:
                self.clear(force=True)
            except Exception:  # interpreter shutdown: the CUDA runtime may already be gone
                pass


# ---------------------------------------------------------------------------------- budget
def node_available_bytes() -> int:
    """Host RAM available to new allocations on this node (MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    # MemAvailable also counts reclaimable page cache; free pages alone are the safe fallback.
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _local_ranks_from_env() -> int:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        # SLURM writes heterogeneous layouts as e.g. "4(x2)": take the leading count.
        digits = value.split("(")[0].split(",")[0].strip()
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


def default_host_budget_bytes(local_ranks: int | None = None, share: float = 0.5) -> int:
    """This rank's share of the node's available RAM: ``share`` of it, split over local ranks.

    Every rank on the node pins its own pool, so the node's RAM is divided between them; the other
    ``1 - share`` is left for the data loader, checkpoints and the OS.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must lie in (0, 1], got {share}")
    ranks = local_ranks if local_ranks is not None else _local_ranks_from_env()
    if ranks < 1:
        raise ValueError(f"local_ranks must be >= 1, got {ranks}")
    return int(node_available_bytes() * share) // ranks
