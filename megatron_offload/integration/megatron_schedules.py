"""Megatron-Core's pipeline schedules as both schedule paths read them.

The module (:func:`schedules_module`), its three schedule functions, the model chunks and the
pipeline group of one schedule call (:func:`model_chunks`, :func:`pipeline_group`) and this
rank's (F/B, chunk, microbatch) order predicted from Megatron's own helpers
(:func:`predict_rank_order`). Used by the patches of :mod:`.megatron_core` and by the
executor path of :mod:`.gis_schedule`; it patches nothing.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

from megatron_offload.releases import SUPPORTED_RANGE, SUPPORTED_TEXT, call_by_name
from megatron_offload.schedule.ir import Op
from megatron_offload.schedule.kinds import OpKind

SCHEDULES = "megatron.core.pipeline_parallel.schedules"
NO_PIPELINING = "forward_backward_no_pipelining"
WITHOUT_INTERLEAVING = "forward_backward_pipelining_without_interleaving"
WITH_INTERLEAVING = "forward_backward_pipelining_with_interleaving"
SCHEDULE_FUNCTIONS = (NO_PIPELINING, WITHOUT_INTERLEAVING, WITH_INTERLEAVING)
"""The schedule functions ``get_forward_backward_func`` chooses among."""
PIPELINED = (WITHOUT_INTERLEAVING, WITH_INTERLEAVING)
"""The two that run a pipeline (PP > 1)."""


def schedules_module():
    """``megatron.core.pipeline_parallel.schedules``; ImportError naming the supported range."""
    try:
        from megatron.core.pipeline_parallel import schedules
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            f"--pipeline-offload needs megatron-core ({SUPPORTED_TEXT}); could not import "
            f"{SCHEDULES}: {error}. Install it with: pip install 'megatron-core{SUPPORTED_RANGE}'"
        ) from error
    return schedules


def model_chunks(model) -> list:
    """The model chunks of a schedule call's ``model`` (one module or a list of chunks)."""
    return model if isinstance(model, list) else [model]


def pipeline_group(kwargs):
    """The pipeline group the schedule itself uses: every supported release takes
    ``p2p_communicator.pp_group`` when a communicator is passed (together with
    ``pg_collection``) and builds one on ``parallel_state``'s pipeline group otherwise."""
    communicator = kwargs.get("p2p_communicator")
    if communicator is not None:
        return communicator.pp_group  # a communicator without one was refused before
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


@dataclass(slots=True)
class RankOrder:
    rank: int
    ops: list[Op]


def predict_rank_order(name: str, kwargs, config, num_chunks: int) -> RankOrder:
    """This rank's (F/B, chunk, microbatch) order, from Megatron's own helpers."""
    schedules = schedules_module()
    m = kwargs["num_microbatches"]
    if name == NO_PIPELINING:
        ops = [op for mb in range(m)
               for op in (Op(OpKind.FORWARD, 0, mb), Op(OpKind.BACKWARD, 0, mb))]
        return RankOrder(rank=0, ops=ops)
    group = pipeline_group(kwargs)
    p, r = group.size(), group.rank()
    interleaved = name == WITH_INTERLEAVING
    v = num_chunks if interleaved else 1
    g = (config.microbatch_group_size_per_vp_stage or p) if interleaved else m
    communicator = types.SimpleNamespace(
        pp_group=group, virtual_pipeline_model_parallel_size=v if interleaved else None
    )
    total, _, warmup, remaining = call_by_name(
        schedules.get_pp_rank_microbatches,
        num_microbatches=m,
        num_model_chunks=v,
        microbatch_group_size_per_vp_stage=g,
        forward_only=False,
        overlap_moe_expert_parallel_comm=False,
        p2p_communicator=communicator,
    )
    table = (
        call_by_name(schedules.get_schedule_table, num_microbatches=m, num_model_chunks=v,
                     microbatch_group_size_per_vp_stage=g)
        if interleaved else [(mb, 0) for mb in range(m)]
    )

    def forward(k: int) -> Op:
        microbatch, chunk = table[k]
        return Op(OpKind.FORWARD, chunk, microbatch)

    def backward(k: int) -> Op:
        # Backward k runs the chunks in reverse (v - 1 - table chunk), FIFO per chunk.
        microbatch, chunk = table[k]
        return Op(OpKind.BACKWARD, v - 1 - chunk, microbatch)

    ops = [forward(k) for k in range(warmup)]
    for k in range(remaining):
        ops += [forward(warmup + k), backward(k)]
    ops += [backward(k) for k in range(remaining, total)]
    return RankOrder(rank=r, ops=ops)
