"""OffloadConfig: every knob of the offload runtime, typed and validated once.

Errors raise ``ValueError`` naming the command-line flag and the fix, before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

OffloadPolicy = Literal["none", "full", "chunks", "auto"]
TransferBackendName = Literal["auto", "cpu", "cuda"]
MemoryBudgetScope = Literal["activations", "device"]

POLICIES: tuple[str, ...] = get_args(OffloadPolicy)
BACKENDS: tuple[str, ...] = get_args(TransferBackendName)
BUDGET_SCOPES: tuple[str, ...] = get_args(MemoryBudgetScope)


@dataclass(kw_only=True, slots=True)
class OffloadConfig:
    policy: OffloadPolicy = "full"
    """What to offload (--offload-policy). ``none``: nothing (hooks only measure, if asked);
    ``full``: every (chunk, microbatch) unit whose backward does not directly follow its
    forward; ``chunks``: only units of model chunks < K (--offload-chunks), the longest-lived
    first; ``auto``: the planner chooses, at the first training call, the fewest units
    (longest-lived first) that keep this rank's resident activations within
    --offload-memory-budget-gib (``planner.choose_offload_units``)."""

    offload_chunks: int | None = None
    """K for policy ``chunks`` (--offload-chunks): offload units of model chunks 0..K-1.
    Must lie in 0..v (v = number of virtual pipeline stages, 1 without interleaving)."""

    memory_budget_gib: float | None = None
    """For policy ``auto`` (--offload-memory-budget-gib): the most activation memory one rank
    may keep resident, in GiB: the bytes of saved activations plus received inputs the runtime
    measures at step boundaries (``IterationStats.peak_saved_bytes``). Parameters, gradients,
    optimizer state and the transient memory inside a forward or backward are not part of it
    (``megatron-offload plan`` prints them per rank). With ``memory_budget_scope="device"`` it
    is the whole device memory instead (GPU only)."""

    memory_budget_scope: MemoryBudgetScope = "activations"
    """What --offload-memory-budget-gib counts (--offload-memory-budget-scope).
    ``activations`` (default): resident activation bytes, as above, on CPU and GPU alike.
    ``device``: total device memory; the activation budget is then the budget minus
    ``torch.cuda.memory_allocated()`` at the first training call (parameters, gradient
    buffers, optimizer state allocated so far), minus the Adam moments not yet allocated
    before the first optimizer step, minus the predicted working memory of a backward
    (``costmodel.working_bytes``), minus --offload-memory-reserve-gib."""

    memory_reserve_gib: float = 2.0
    """With ``memory_budget_scope="device"``: GiB kept out of the budget for the CUDA
    context's allocations outside PyTorch, NCCL buffers and allocator fragmentation
    (--offload-memory-reserve-gib)."""

    min_offload_bytes: int = 64 * 1024
    """Saved tensors smaller than this stay on the device (--offload-min-bytes): a copy of a
    few KiB costs more in launch latency than it frees."""

    backend: TransferBackendName = "auto"
    """How bytes move (--offload-backend). ``cuda``: D2H/H2D streams, events, pinned pool;
    ``cpu``: synchronous copies into a separate host pool (tests, CPU runs); ``auto``: cuda
    when the model lives on a GPU, else cpu."""

    measure_memory: bool = False
    """Track every saved storage through weak references and report the peak of bytes
    really resident (--offload-report). Costs one Python call per saved tensor."""

    prefetch_distance: int = 1
    """How many ops ahead a reload is started (--offload-prefetch). 1 = reload the unit
    of the next backward when the op before it starts."""

    host_budget_gib: float | None = None
    """Most host memory this rank's offload pool may hold, in GiB (--offload-host-budget-gib).
    None: half of the node's available RAM divided by the ranks on the node. The pool refuses,
    with an error naming this flag, the allocation that would cross it."""

    def __post_init__(self) -> None:
        _require_int("--offload-min-bytes", self.min_offload_bytes)
        _require_int("--offload-prefetch", self.prefetch_distance)
        if not isinstance(self.measure_memory, bool):
            raise ValueError(
                f"--offload-report takes no value; OffloadConfig.measure_memory must be True "
                f"or False, not {self.measure_memory!r}"
            )
        if self.host_budget_gib is not None and (
            isinstance(self.host_budget_gib, bool)
            or not isinstance(self.host_budget_gib, (int, float))
            or not self.host_budget_gib > 0
        ):
            raise ValueError(
                f"--offload-host-budget-gib {self.host_budget_gib!r} must be a number of GiB "
                "> 0 (or leave it unset for half the node's available RAM per local rank)"
            )
        if self.policy not in POLICIES:
            raise ValueError(
                f"--offload-policy {self.policy!r} is not a policy; choose one of "
                f"{', '.join(POLICIES)}"
            )
        if self.policy == "chunks":
            if self.offload_chunks is None:
                raise ValueError(
                    "--offload-policy chunks needs --offload-chunks K (offload model chunks "
                    "0..K-1); add e.g. --offload-chunks 1"
                )
            if (
                isinstance(self.offload_chunks, bool)
                or not isinstance(self.offload_chunks, int)
                or self.offload_chunks < 0
            ):
                raise ValueError(
                    f"--offload-chunks {self.offload_chunks!r} must be an integer in 0..v "
                    "(v = virtual pipeline stages); use e.g. --offload-chunks 1"
                )
        elif self.offload_chunks is not None:
            raise ValueError(
                f"--offload-chunks {self.offload_chunks} only applies to --offload-policy "
                f"chunks, not {self.policy!r}; drop it or set --offload-policy chunks"
            )
        if self.policy == "auto":
            if self.memory_budget_gib is None:
                raise ValueError(
                    "--offload-policy auto needs --offload-memory-budget-gib X (the most "
                    "activation memory one rank may keep resident, GiB); add e.g. "
                    "--offload-memory-budget-gib 20, or see `megatron-offload plan`"
                )
            if (
                isinstance(self.memory_budget_gib, bool)
                or not isinstance(self.memory_budget_gib, (int, float))
                or not self.memory_budget_gib > 0
                or self.memory_budget_gib != self.memory_budget_gib  # NaN
                or self.memory_budget_gib == float("inf")
            ):
                raise ValueError(
                    f"--offload-memory-budget-gib {self.memory_budget_gib!r} must be a finite "
                    "number of GiB > 0; e.g. --offload-memory-budget-gib 20"
                )
        elif self.memory_budget_gib is not None:
            raise ValueError(
                f"--offload-memory-budget-gib {self.memory_budget_gib} only applies to "
                f"--offload-policy auto, not {self.policy!r}; drop it or set --offload-policy auto"
            )
        if self.memory_budget_scope not in BUDGET_SCOPES:
            raise ValueError(
                f"--offload-memory-budget-scope {self.memory_budget_scope!r} is not a scope; "
                f"choose one of {', '.join(BUDGET_SCOPES)}"
            )
        if (
            isinstance(self.memory_reserve_gib, bool)
            or not isinstance(self.memory_reserve_gib, (int, float))
            or not self.memory_reserve_gib >= 0
        ):
            raise ValueError(
                f"--offload-memory-reserve-gib {self.memory_reserve_gib!r} must be a number of "
                "GiB >= 0"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"--offload-backend {self.backend!r} is not a backend; choose one of "
                f"{', '.join(BACKENDS)}"
            )
        if self.min_offload_bytes < 0:
            raise ValueError(
                f"--offload-min-bytes {self.min_offload_bytes} must be >= 0 (0 offloads "
                "every non-parameter tensor)"
            )
        if self.prefetch_distance < 1:
            raise ValueError(
                f"--offload-prefetch {self.prefetch_distance} must be >= 1: a reload has "
                "to start at least one op before the backward that needs it"
            )

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_gib is None else int(self.memory_budget_gib * 2**30)

    @property
    def host_budget_bytes(self) -> int | None:
        return None if self.host_budget_gib is None else int(self.host_budget_gib * 2**30)

    def check_against_model(self, num_model_chunks: int) -> None:
        """Validate the settings that depend on the model (v); raises before the first step."""
        if self.policy == "chunks" and not 0 <= self.offload_chunks <= num_model_chunks:
            raise ValueError(
                f"--offload-chunks {self.offload_chunks} is outside 0..{num_model_chunks} "
                f"(this model has {num_model_chunks} model chunk(s) per rank); use a value "
                f"in that range"
            )

    def offloads_chunk(self, chunk: int) -> bool:
        if self.policy == "full":
            return True
        if self.policy == "chunks":
            return chunk < self.offload_chunks
        return False


def _require_int(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{flag} {value!r} must be an integer")


__all__ = ["OffloadConfig", "OffloadPolicy", "POLICIES", "BACKENDS", "BUDGET_SCOPES"]
