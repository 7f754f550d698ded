"""``--offload-schedule gis``: Megatron's pipelined schedule functions run the executor.

With ``OffloadConfig(schedule="gis")``, the ``megatron-core schedules`` patch set of
:func:`megatron_core.install` replaces
``megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_without_interleaving``
and ``megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_with_interleaving``
by :func:`gis_schedule_function` (same keyword arguments, same return value), so every caller
of ``get_forward_backward_func()`` (Megatron-LM's ``train()`` and ``evaluate()`` included) runs
PipeOffload's generalized interleaving. Per call:

1. the schedule IR: ``schedule.gis.gis_schedule(p, v, m, g)`` with g = --offload-group-size
   (default p, capped at m), then the offload pass (``schedule.offload.plan_offload``) for
   the policy's candidate chunks, which places each O right after its forward and each R as
   late as the host link allows (:func:`costs_for`), validated (structure, p2p order,
   deadlock) before any step runs; cached per shape, so a call with another microbatch count
   simply gets its own schedule;
2. the p2p plan of that schedule (``schedule.p2p``);
3. ``runtime.executor.run_rank`` on this rank's row; the offload runtime follows the same
   row as its runtime list (``--offload-granularity unit``: copies exactly at the IR's O and
   R ops), or at ``layer`` granularity the layer-level expansion of the GIS order
   (``policy.runtime_plan``) with the units the offload pass chose.

Forward-only calls run the same schedule's forwards, without hooks. The no-pipelining function
(PP = 1) stays Megatron's. What the executor cannot run is refused before the first step
(the ``gis`` rows of :mod:`.refusals`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from megatron_offload.config import OffloadConfig
from megatron_offload.integration.megatron_schedules import (
    RankOrder,
    model_chunks,
    pipeline_group,
    schedules_module,
)
from megatron_offload.integration.offload_runtime import (
    OffloadRuntime,
    compute_device,
    offloader_for,
    runtime_plan_for,
)
from megatron_offload.integration.refusals import refuse_for_gis, refuse_unsupported
from megatron_offload.releases import call_by_name
from megatron_offload.runtime.executor import run_rank
from megatron_offload.runtime.offloader import iteration
from megatron_offload.schedule.costs import CostModel
from megatron_offload.schedule.gis import gis_schedule
from megatron_offload.schedule.ir import Schedule
from megatron_offload.schedule.kinds import OpKind
from megatron_offload.schedule.megatron import megatron_schedule
from megatron_offload.schedule.offload import plan_offload
from megatron_offload.schedule.p2p import P2PPlan, build_plan
from megatron_offload.schedule.validate import validate_schedule


@dataclass(slots=True)
class ExecutorSettings:
    """Process-wide knobs of the executor path (tests and benchmarks set them)."""

    timeout_s: float = 300.0
    """How long a rank waits for one p2p message before raising PeerTimeoutError."""
    order: str = "gis"
    """``gis``: generalized interleaving (the product). ``megatron``: the executor runs
    Megatron's own 1F1B / interleaved order (g = Megatron's group size), for comparisons."""


settings = ExecutorSettings()


def costs_for(backend: str) -> CostModel:
    """The cost model the offload pass plans the copies with. The CPU backend copies
    synchronously at the O / R op (no link time to hide): k = 0, so every unit with a
    lifespan moves and each R lands right before its backward. On a GPU: k = 1 (a round trip
    as long as the unit's forward + backward) until the measured link speed is wired in."""
    return CostModel(offload_ratio=0.0 if backend == "cpu" else 1.0)


@functools.lru_cache(maxsize=64)
def planned_schedule(pp: int, vpp: int, microbatches: int, group_size: int, policy: str,
                     offload_chunks: int | None, backend: str,
                     order: str = "gis") -> tuple[Schedule, P2PPlan, P2PPlan]:
    """(GIS schedule with the offload pass's copies, its p2p plan, its forward-only plan);
    raises ScheduleError (with the grid) for a schedule that would deadlock. ``order``
    ``megatron``: Megatron's 1F1B (v = 1) or interleaved order with group size ``group_size``."""
    if order == "megatron":
        compute = (megatron_schedule("1f1b", pp, 1, microbatches) if vpp == 1
                   else megatron_schedule("interleaved", pp, vpp, microbatches, group_size))
    else:
        compute = gis_schedule(pp, vpp, microbatches, group_size)
    if policy == "none" or (policy == "chunks" and offload_chunks == 0):
        schedule = compute
    else:
        chunks = offload_chunks if policy == "chunks" else None
        schedule = plan_offload(compute, costs_for(backend), chunks=chunks).schedule
    validate_schedule(schedule)
    return schedule, build_plan(schedule), build_plan(schedule, forward_only=True)


def _default_pg_collection(schedules):
    build = getattr(schedules, "_build_default_pg_collection", None)
    if build is not None:  # 0.19
        return build()
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection()
    pgs.tp = parallel_state.get_tensor_model_parallel_group()
    pgs.cp = parallel_state.get_context_parallel_group()
    pgs.embd = parallel_state.get_embedding_group(check_initialized=False)
    pgs.pos_embd = parallel_state.get_position_embedding_group(check_initialized=False)
    pgs.pp = parallel_state.get_pipeline_model_parallel_group()
    pgs.dp_cp = parallel_state.get_data_parallel_group(
        with_context_parallel=True, partial_data_parallel=False
    )
    return pgs


def gis_schedule_function(runtime: OffloadRuntime, name: str, original):
    """The replacement of Megatron's pipelined schedule function ``name``."""

    def schedule_function(**kwargs):
        if runtime.active:
            raise RuntimeError(
                "megatron-offload: a pipeline schedule was called from inside another one"
            )
        from megatron.core.utils import get_model_config

        chunks = model_chunks(kwargs["model"])
        config = get_model_config(chunks[0])
        refuse_unsupported(config, runtime.release, schedule_kwargs=kwargs)
        refuse_for_gis(config, runtime.release, kwargs)
        runtime.config.check_against_model(len(chunks))
        group = pipeline_group(kwargs)
        if group.size() == 1:
            return original(**kwargs)
        schedule, plan, forward_plan = _planned_for_call(runtime.config, kwargs, chunks, config,
                                                         group.size())
        common, finalize = _executor_arguments(runtime, kwargs, chunks, config, schedule, group)
        timers = getattr(config, "timers", None)
        if timers is not None:
            timers("forward-backward", log_level=1).start(barrier=config.barrier_with_L1_time)
        try:
            if kwargs.get("forward_only", False):
                return run_rank(plan=forward_plan, forward_only=True, **common)
            return _training_call(runtime, chunks, config, schedule, plan, finalize, common)
        finally:
            if timers is not None:
                timers("forward-backward").stop()

    schedule_function.__name__ = name
    return schedule_function


def _planned_for_call(offload_config: OffloadConfig, kwargs, chunks, config, pp: int):
    """:func:`planned_schedule` for this call's shape: g = --offload-group-size (default p,
    capped at m; Megatron's own with ``settings.order == "megatron"``), the backend resolved
    from the parameters' device for ``auto``."""
    m = kwargs["num_microbatches"]
    g = min(offload_config.group_size or pp, m)
    if settings.order == "megatron":
        g = config.microbatch_group_size_per_vp_stage or pp
    backend = offload_config.backend
    if backend == "auto":
        backend = "cuda" if compute_device(chunks).type == "cuda" else "cpu"
    return planned_schedule(pp, len(chunks), m, g, offload_config.policy,
                            offload_config.offload_chunks, backend, settings.order)


def _executor_arguments(runtime: OffloadRuntime, kwargs, chunks, config, schedule: Schedule, group):
    """(the keyword arguments of ``run_rank`` common to both passes, the finalize callback):
    Megatron's own steps, the tensor shape sent between stages ([seq / CP (/ TP with sequence
    parallelism), micro-batch, hidden]) and the process groups of this call."""
    from megatron.core.utils import get_model_type

    pg_collection = kwargs.get("pg_collection") or _default_pg_collection(schedules_module())
    cp = pg_collection.cp.size() if getattr(pg_collection, "cp", None) is not None else 1
    shape = [kwargs["seq_length"], kwargs["micro_batch_size"], config.hidden_size]
    shape[0] //= cp
    if getattr(config, "sequence_parallel", False):
        shape[0] //= pg_collection.tp.size()

    def finalize(tokens):
        if config.finalize_model_grads_func is not None:
            config.finalize_model_grads_func(
                chunks, tokens if config.calculate_per_token_loss else None,
                pg_collection=pg_collection, force_all_reduce=kwargs.get("force_all_reduce", False))

    common = dict(
        schedule=schedule, rank=group.rank(), forward_step_func=kwargs["forward_step_func"],
        data_iterator=kwargs["data_iterator"], model=chunks,
        num_microbatches=kwargs["num_microbatches"], config=config, pp_group=group,
        tensor_shape=shape, forward_step=runtime.original("forward_step"),
        backward_step=runtime.original("backward_step"), call_by_name=call_by_name,
        cp_group_size=cp, collect_non_loss_data=kwargs.get("collect_non_loss_data", False),
        first_val_step=kwargs.get("first_val_step"), model_type=get_model_type(chunks[0]),
        timeout_s=settings.timeout_s,
    )
    return common, finalize


def _training_call(runtime: OffloadRuntime, chunks, config, schedule: Schedule, plan: P2PPlan,
                   finalize, common: dict):
    """A training pass: this rank's row under the offload runtime (``--offload-granularity
    unit``: the offload pass's copies where it put them; ``layer``: the layer-level expansion
    of the row's order with the units it offloads)."""
    rank = common["rank"]
    offloader = offloader_for(runtime, chunks, rank)
    row = schedule.ranks[rank]
    order = [op for op in row if op.kind in (OpKind.FORWARD, OpKind.BACKWARD)]
    units = {op.unit for op in row if op.kind is OpKind.OFFLOAD}
    if runtime.config.granularity == "unit":
        entries = list(row)  # the offload pass's copies, where it put them
    else:
        entries = runtime_plan_for(runtime, offloader, chunks, config,
                                   RankOrder(rank=rank, ops=order), units)
    runtime.active = True
    try:
        with iteration(offloader, order, units, plan=entries):
            return run_rank(plan=plan, offloader=offloader, finalize=finalize, **common)
    finally:
        runtime.active = False
