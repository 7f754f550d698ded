"""The megatron-core releases the plugin supports, and what differs between them.

One leaf module (no torch, no Megatron at import time; nothing of this package imported) that
every other module may use: the supported range (:data:`SUPPORTED_RANGE`,
:data:`SUPPORTED_TEXT`), the per-release facts (:data:`RELEASES`, one :class:`Release` per
minor version, each fact read from that release's wheel), the version check
(:func:`check_megatron_version`, :func:`release`) and :func:`call_by_name`, through which
every call into Megatron binds its arguments by name.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

SUPPORTED_MINORS = (16, 17, 18, 19)
"""megatron-core 0.<minor>.x releases the plugin supports (the keys of :data:`RELEASES`)."""
SUPPORTED_RANGE = ">=0.16,<0.20"
"""The supported releases as a pip version specifier."""
SUPPORTED_TEXT = "megatron-core 0.16.x to 0.19.x (>=0.16,<0.20)"
"""The supported releases in words, for messages and documents."""

@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """What differs between supported megatron-core releases, as far as the plugin and its CPU
    support (``integration/cpu/core.py``) depend on it. Each fact was read from that release's
    wheel (``megatron/core/...``); the field docstrings say where."""

    minor: int
    """0.<minor>.x"""

    backward_step_takes_model_type: bool
    """``pipeline_parallel/schedules.py`` ``backward_step(input_tensor, output_tensor,
    output_tensor_grad, model_type, config)`` in 0.16; 0.17 dropped ``model_type``."""

    multimodule_pipelines: bool
    """0.17+: ``forward_backward_pipelining_without_interleaving`` takes a
    ``MultiModuleProcessGroupCollection`` (``process_groups_config.py``) or a
    ``MultiModulePipelineCommunicator`` (``pipeline_parallel/multimodule_communicator.py``,
    no ``pp_group``) and then runs ``backward_step_multimodule``, which is not patched."""

    moe_paged_stash: bool
    """0.18+: ``TransformerConfig.moe_paged_stash`` (``transformer/moe/paged_stash.py`` installs
    its own ``saved_tensors_hooks``) and ``moe_expert_rank_capacity_factor`` (Megatron-LM's
    ``training.py`` then wraps the schedule in ``PagedStashRunner``, which may rerun it)."""

    full_iteration_graph_field: str
    """Where a whole-iteration CUDA graph is asked for: 0.16/0.17 ``cuda_graph_scope``
    containing ``full_iteration`` (with ``cuda_graph_impl="local"``); 0.18+
    ``cuda_graph_impl="full_iteration"`` (``training.py`` wraps the schedule in
    ``FullCudaGraphWrapper``)."""

    interleaved_waits_on_sends: bool
    """0.18+: the interleaved schedule waits on ``send_next_wait_handle`` before
    ``deallocate_output_tensor`` frees a sent output (the upstream fix of the isend/deallocate
    race that ``cpu_shims``' keep-alive works around on gloo for 0.16/0.17)."""

    checkpoint_without_output_shares_storage: bool
    """0.17+: ``tensor_parallel/random.py`` ``CheckpointWithoutOutput._recompute`` hands the
    recomputed output back through ``_get_share_storage()``, a C++ extension compiled on first
    use with ``torch.utils.cpp_extension.load_inline``; 0.16 resized and copied the storage."""

    grad_sync_reads_current_stream: bool
    """0.19: ``distributed/param_and_grad_buffer.py`` ``_ParamAndGradBucketGroup.
    start_grad_sync`` calls ``torch.cuda.current_stream()`` on every grad sync (to wait on CUDA
    graph wgrad events); before, only with several distributed-optimizer instances."""

    getter_takes_schedule_pg_collection: bool
    """0.19: ``get_forward_backward_func(pp_size, vp_size, schedule_pg_collection)``."""

    ships_megatron_training: bool
    """0.17+: the wheel contains ``megatron/training`` (Megatron-LM's ``pretrain``)."""


RELEASES: dict[int, Release] = {
    16: Release(minor=16, backward_step_takes_model_type=True, multimodule_pipelines=False,
                moe_paged_stash=False, full_iteration_graph_field="cuda_graph_scope",
                interleaved_waits_on_sends=False,
                checkpoint_without_output_shares_storage=False,
                grad_sync_reads_current_stream=False,
                getter_takes_schedule_pg_collection=False, ships_megatron_training=False),
    17: Release(minor=17, backward_step_takes_model_type=False, multimodule_pipelines=True,
                moe_paged_stash=False, full_iteration_graph_field="cuda_graph_scope",
                interleaved_waits_on_sends=False,
                checkpoint_without_output_shares_storage=True,
                grad_sync_reads_current_stream=False,
                getter_takes_schedule_pg_collection=False, ships_megatron_training=True),
    18: Release(minor=18, backward_step_takes_model_type=False, multimodule_pipelines=True,
                moe_paged_stash=True, full_iteration_graph_field="cuda_graph_impl",
                interleaved_waits_on_sends=True,
                checkpoint_without_output_shares_storage=True,
                grad_sync_reads_current_stream=False,
                getter_takes_schedule_pg_collection=False, ships_megatron_training=True),
    19: Release(minor=19, backward_step_takes_model_type=False, multimodule_pipelines=True,
                moe_paged_stash=True, full_iteration_graph_field="cuda_graph_impl",
                interleaved_waits_on_sends=True,
                checkpoint_without_output_shares_storage=True,
                grad_sync_reads_current_stream=True,
                getter_takes_schedule_pg_collection=True, ships_megatron_training=True),
}
"""The supported releases (megatron-core 0.<key>.x)."""


def installed_megatron_version() -> str:
    """``megatron.core.package_info.__version__`` of the installed megatron-core (inside a git
    checkout 0.19 appends ``+<sha>``)."""
    try:
        from megatron.core import package_info
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            f"--pipeline-offload needs megatron-core ({SUPPORTED_TEXT}): {error}. Install it "
            f"with: pip install 'megatron-core{SUPPORTED_RANGE}'"
        ) from error
    return package_info.__version__


def _minor(version: str) -> int | None:
    parts = version.split(".")
    if len(parts) < 2 or parts[0] != "0":
        return None
    digits = ""
    for ch in parts[1]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def check_megatron_version(version: str | None = None) -> str:
    """Raise ValueError unless the installed (or given) megatron-core version is supported."""
    if version is None:
        version = installed_megatron_version()
    if _minor(version) not in RELEASES:
        raise ValueError(
            f"megatron-core {version} is not supported by --pipeline-offload (supported: "
            f"{SUPPORTED_TEXT}); install a supported release, e.g. "
            f"pip install 'megatron-core{SUPPORTED_RANGE}', or run without --pipeline-offload"
        )
    return version


def release(version: str | None = None) -> Release:
    """The :class:`Release` facts of the installed (or given) megatron-core; ValueError
    naming the supported range for any other version."""
    return RELEASES[_minor(check_megatron_version(version))]


def call_by_name(function, /, **arguments):
    """Call a Megatron function (or ``torch.autograd.Function``, through ``apply``) with every
    argument bound by name against the installed release's signature. An argument that the
    signature lacks is dropped if it is one of ``_DROPPABLE`` and an error naming the
    function otherwise: never a silent shift of positional arguments."""
    import torch  # only a caller that already holds a Megatron function gets here

    autograd = isinstance(function, type) and issubclass(function, torch.autograd.Function)
    signature = inspect.signature(function.forward if autograd else function)
    names = list(signature.parameters)[1:] if autograd else list(signature.parameters)  # ctx
    kwargs = {}
    for name, value in arguments.items():
        if name in names:
            kwargs[name] = value
        elif name not in _DROPPABLE:
            raise TypeError(
                f"megatron-offload: {function.__module__}.{function.__qualname__} of the "
                f"installed megatron-core ({installed_megatron_version()}) takes no argument "
                f"{name!r} (supported: {SUPPORTED_TEXT})"
            )
    if not autograd:
        return function(**kwargs)
    missing = [name for name in names if name not in kwargs]
    if missing:
        raise TypeError(
            f"megatron-offload: {function.__qualname__}.apply of the installed megatron-core "
            f"({installed_megatron_version()}) also needs {missing}"
        )
    return function.apply(*(kwargs[name] for name in names))  # apply takes them in order


_DROPPABLE = frozenset({
    "model_type",  # schedules.backward_step: 0.16 only
    # tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication: 0.19+
    "gtp_remat_size",
})
"""Arguments that some supported releases take and others do not (``call_by_name``)."""


def _check_table() -> None:
    """The constants above and the table say the same thing (checked at import)."""
    if tuple(RELEASES) != SUPPORTED_MINORS:  # pragma: no cover - a maintainer's mistake
        raise AssertionError(f"RELEASES {tuple(RELEASES)} != SUPPORTED_MINORS {SUPPORTED_MINORS}")
    low, high = SUPPORTED_MINORS[0], SUPPORTED_MINORS[-1]
    if SUPPORTED_RANGE != f">=0.{low},<0.{high + 1}" or not SUPPORTED_TEXT.startswith(
            f"megatron-core 0.{low}.x to 0.{high}.x"):  # pragma: no cover
        raise AssertionError("SUPPORTED_RANGE / SUPPORTED_TEXT disagree with SUPPORTED_MINORS")


_check_table()
