"""OffloadConfig: every knob of the offload runtime, typed and validated once.

Errors raise ``ValueError`` naming the command-line flag and the fix, before any work starts.
"""
from __future__ import annotations

import argparse
import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

OffloadPolicy = Literal["none", "full", "chunks", "auto"]
TransferBackendName = Literal["auto", "cpu", "cuda"]
MemoryBudgetScope = Literal["activations", "device"]
Granularity = Literal["unit", "layer"]
ScheduleName = Literal["megatron", "gis"]

POLICIES: tuple[str, ...] = get_args(OffloadPolicy)
BACKENDS: tuple[str, ...] = get_args(TransferBackendName)
BUDGET_SCOPES: tuple[str, ...] = get_args(MemoryBudgetScope)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)

ENABLE_FLAG = "--pipeline-offload"
"""The switch: without it no offload flag may be given and nothing is patched."""


def _flag(flag: str, **argparse_kwargs) -> dict:
    """Field metadata: the command-line flag of a field and how argparse reads it. The help
    text is the field's docstring (see :func:`add_offload_arguments`)."""
    return {"flag": flag, "argparse": argparse_kwargs}


@dataclass(kw_only=True, slots=True)
class OffloadConfig:
    policy: OffloadPolicy = field(
        default="full", metadata=_flag("--offload-policy", choices=POLICIES))
    """What to offload (--offload-policy). ``none``: nothing (hooks only measure, if asked);
    ``full``: every (chunk, microbatch) unit whose backward does not directly follow its
    forward; ``chunks``: only units of model chunks < K (--offload-chunks), the longest-lived
    first; ``auto``: the planner chooses, at the first training call, the fewest units
    (longest-lived first) that keep this rank's resident activations within
    --offload-memory-budget-gib (``planning.auto.choose_offload_units``)."""

    offload_chunks: int | None = field(
        default=None, metadata=_flag("--offload-chunks", type=int, metavar="K"))
    """K for policy ``chunks`` (--offload-chunks): offload units of model chunks 0..K-1.
    Must lie in 0..v (v = number of virtual pipeline stages, 1 without interleaving)."""

    memory_budget_gib: float | None = field(
        default=None, metadata=_flag("--offload-memory-budget-gib", type=float, metavar="GIB"))
    """For policy ``auto`` (--offload-memory-budget-gib): the most activation memory one rank
    may keep resident, in GiB: the bytes of saved activations plus received inputs the runtime
    measures at step boundaries (``IterationStats.peak_saved_bytes``). Parameters, gradients,
    optimizer state and the transient memory inside a forward or backward are not part of it
    (``megatron-offload plan`` prints them per rank). With ``memory_budget_scope="device"`` it
    is the whole device memory instead (GPU only)."""

    memory_budget_scope: MemoryBudgetScope = field(
        default="activations",
        metadata=_flag("--offload-memory-budget-scope", choices=BUDGET_SCOPES))
    """What --offload-memory-budget-gib counts (--offload-memory-budget-scope).
    ``activations`` (default): resident activation bytes, as above, on CPU and GPU alike.
    ``device``: total device memory; the activation budget is then the budget minus
    ``torch.cuda.memory_allocated()`` at the first training call (parameters, gradient
    buffers, optimizer state allocated so far), minus the Adam moments not yet allocated
    before the first optimizer step, minus the predicted working memory of a backward
    (``costmodel.working_bytes``), minus --offload-memory-reserve-gib."""

    memory_reserve_gib: float = field(
        default=2.0, metadata=_flag("--offload-memory-reserve-gib", type=float, metavar="GIB"))
    """With ``memory_budget_scope="device"``: GiB kept out of the budget for the CUDA
    context's allocations outside PyTorch, NCCL buffers and allocator fragmentation
    (--offload-memory-reserve-gib)."""

    min_offload_bytes: int = field(
        default=64 * 1024, metadata=_flag("--offload-min-bytes", type=int, metavar="BYTES"))
    """Saved tensors smaller than this stay on the device (--offload-min-bytes): a copy of a
    few KiB costs more in launch latency than it frees."""

    backend: TransferBackendName = field(
        default="auto", metadata=_flag("--offload-backend", choices=BACKENDS))
    """How bytes move (--offload-backend). ``cuda``: D2H/H2D streams, events, pinned pool;
    ``cpu``: synchronous copies into a separate host pool (tests, CPU runs); ``auto``: cuda
    when the model lives on a GPU, else cpu."""

    measure_memory: bool = field(
        default=False, metadata=_flag("--offload-report", action="store_const", const=True))
    """Track every saved storage through weak references and report the peak of bytes
    really resident (--offload-report). Costs one Python call per saved tensor."""

    granularity: Granularity = field(
        default="layer", metadata=_flag("--offload-granularity", choices=GRANULARITIES))
    """What moves as one piece (--offload-granularity). ``layer`` (default): each transformer
    layer's activations are their own piece: they start moving out when the layer's forward
    ends (while the next layer computes) and come back layer by layer in the backward, just
    before the layer that needs them; a unit the policy offloads leaves entirely (embedding,
    output layer and loss too) when other ops run between its forward and backward, and still
    streams all its layers but the last when its backward follows its forward directly (last
    pipeline stage). Layers under full recompute stream nothing. ``unit``: a (chunk,
    microbatch) unit's activations leave after its forward and come back before its
    backward, whole (fewer, larger copies; about two units stay resident per rank)."""

    prefetch_distance: int | None = field(
        default=None, metadata=_flag("--offload-prefetch", type=int, metavar="OPS"))
    """How far ahead a reload starts, in ops (--offload-prefetch): with ``unit`` granularity
    in forward/backward steps (>= 1), with ``layer`` in layer forwards/backwards (>= 0; 0 =
    right before the layer that needs it). Default: 1 step for ``unit``; for ``layer`` 1 layer
    on CUDA and 0 on the CPU backend, whose copies are synchronous."""

    host_budget_gib: float | None = field(
        default=None, metadata=_flag("--offload-host-budget-gib", type=float, metavar="GIB"))
    """Most host memory this rank's offload pool may hold, in GiB (--offload-host-budget-gib).
    None: half of the node's available RAM divided by the ranks on the node. The pool refuses,
    with an error naming this flag, the allocation that would cross it."""

    schedule: ScheduleName = field(
        default="megatron", metadata=_flag("--offload-schedule", choices=SCHEDULES))
    """Which pipeline schedule runs the training steps (--offload-schedule). ``megatron``:
    Megatron-Core's own 1F1B / interleaved functions, with the offload runtime under them and
    each reload started --offload-prefetch ops ahead. ``gis``: PipeOffload's generalized
    interleaving with microbatch groups of --offload-group-size, run by the plugin's executor
    (``runtime/executor.py``) in place of Megatron's functions, with offloads and reloads at
    the positions the offload pass plans (a reload as late as the host link allows)."""

    group_size: int | None = field(
        default=None, metadata=_flag("--offload-group-size", type=int, metavar="G"))
    """Microbatches per group for --offload-schedule gis (--offload-group-size): any G in
    1..m (Megatron requires p <= G); smaller groups keep fewer units resident and cost
    bubble time. None = p (GIS with Megatron's group size: 1F1B's peak at Megatron's
    makespan); capped at the microbatch count of each call."""

    def __post_init__(self) -> None:
        _require_int("--offload-min-bytes", self.min_offload_bytes)
        if self.prefetch_distance is not None:
            _require_int("--offload-prefetch", self.prefetch_distance)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"--offload-granularity {self.granularity!r} is not a granularity; choose one "
                f"of {', '.join(GRANULARITIES)}"
            )
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
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"--offload-schedule {self.schedule!r} is not a schedule; choose one of "
                f"{', '.join(SCHEDULES)}"
            )
        if self.group_size is not None:
            if self.schedule != "gis":
                raise ValueError(
                    f"--offload-group-size {self.group_size} only applies to --offload-schedule "
                    f"gis, not {self.schedule!r}; drop it or add --offload-schedule gis"
                )
            if (
                isinstance(self.group_size, bool)
                or not isinstance(self.group_size, int)
                or self.group_size < 1
            ):
                raise ValueError(
                    f"--offload-group-size {self.group_size!r} must be an integer >= 1 "
                    "(microbatches per group); e.g. --offload-group-size 2"
                )
        if self.schedule == "gis" and self.policy == "auto":
            raise ValueError(
                "--offload-policy auto is not supported with --offload-schedule gis yet (the "
                "planner plans Megatron's orders); use --offload-policy full / chunks / none "
                "with gis, or --offload-schedule megatron with auto"
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
        if self.prefetch_distance is not None:
            least = 1 if self.granularity == "unit" else 0
            if self.prefetch_distance < least:
                raise ValueError(
                    f"--offload-prefetch {self.prefetch_distance} must be >= {least} with "
                    f"--offload-granularity {self.granularity}: "
                    + ("a unit's reload has to start at least one step before the backward "
                       "that needs it" if least else "0 reloads right before the layer")
                )

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_gib is None else int(self.memory_budget_gib * 2**30)

    @property
    def unit_prefetch_distance(self) -> int:
        """The reload distance in steps at unit granularity."""
        return 1 if self.prefetch_distance is None else self.prefetch_distance

    def layer_reload_distance(self, *, synchronous_copies: bool) -> int:
        """The reload distance in layer entries at layer granularity."""
        if self.prefetch_distance is not None:
            return self.prefetch_distance
        return 0 if synchronous_copies else 1

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


# ------------------------------------------------------------------ the command-line flags
# One definition shared by ``megatron-offload train``, the Megatron-LM launcher
# (``python -m megatron_offload.launch``) and the patched pretrain scripts of ``patches/``.

@functools.cache
def _field_docs() -> dict[str, str]:
    """Each field's docstring (the string right under it in the class body), whitespace
    collapsed: the ``--help`` text of its flag."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(OffloadConfig)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def offload_flags() -> dict[str, str]:
    """{flag: OffloadConfig field} for every offload flag, ``--pipeline-offload`` excluded."""
    return {f.metadata["flag"]: f.name for f in fields(OffloadConfig) if "flag" in f.metadata}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_offload_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--pipeline-offload`` and the offload flags to ``parser`` (Megatron-LM's own
    parser in the launcher, this package's in ``megatron-offload train``), in one group.

    Every offload flag defaults to None, so "given" can be told from "left at its default";
    the defaults that apply are the OffloadConfig defaults, shown in the help. Idempotent.
    """
    if ENABLE_FLAG in parser._option_string_actions:
        return parser
    docs = _field_docs()
    group = parser.add_argument_group(
        "pipeline offload (megatron-offload)",
        "PipeOffload: pipeline-parallel activations to host memory and back, bitwise "
        "identical losses. Off unless --pipeline-offload is given.",
    )
    group.add_argument(
        ENABLE_FLAG, action="store_true",
        help="Offload and reload pipeline-parallel activations (megatron-offload plugin).",
    )
    for f in fields(OffloadConfig):
        if "flag" not in f.metadata:
            continue
        flag = f.metadata["flag"]
        help_text = docs.get(f.name, "").replace(f" ({flag})", "").replace("``", "")
        help_text = help_text.replace("%", "%%")
        if f.default is not None and f.metadata["argparse"].get("action") != "store_const":
            help_text += f" Default: {f.default}."
        group.add_argument(
            flag, dest=_dest(flag), default=None, help=help_text,
            **f.metadata["argparse"],
        )
    return parser


def offload_config_from_args(args: argparse.Namespace, **overrides) -> OffloadConfig | None:
    """The OffloadConfig the parsed flags ask for, or None without ``--pipeline-offload``.

    Raises ValueError (naming the flag and the fix) for an offload flag given without
    ``--pipeline-offload`` and for every invalid value. ``overrides`` are field values that
    apply where the flag was not given (``megatron-offload train`` sets a few for CPU runs).
    """
    given = {flag: name for flag, name in offload_flags().items()
             if getattr(args, _dest(flag), None) is not None}
    if not getattr(args, "pipeline_offload", False):
        if given:
            flags = ", ".join(given)
            raise ValueError(
                f"{flags} given without {ENABLE_FLAG}: offloading is off unless asked for; "
                f"add {ENABLE_FLAG}, or drop {flags}"
            )
        return None
    values = dict(overrides)
    values.update({name: getattr(args, _dest(flag)) for flag, name in given.items()})
    return OffloadConfig(**values)


def _require_int(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{flag} {value!r} must be an integer")


__all__ = [
    "OffloadConfig", "OffloadPolicy", "POLICIES", "BACKENDS", "BUDGET_SCOPES", "GRANULARITIES",
    "SCHEDULES", "ENABLE_FLAG",
    "offload_flags", "add_offload_arguments", "offload_config_from_args",
]
