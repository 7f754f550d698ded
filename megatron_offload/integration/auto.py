"""``--offload-policy auto`` on megatron-core: from the live model to the planner's offload set.

At the first training call of each schedule shape (schedule function, microbatches, sequence
length, micro batch size), :func:`auto_offload_units`:

1. describes the job for the cost model (:func:`job_from_model`): a
   :class:`~megatron_offload.planning.job.JobSpec` from the model's ``TransformerConfig``, the
   GPT model itself (vocabulary, positions, local or Transformer Engine layers, parameter
   device), the schedule call's ``seq_length`` / ``micro_batch_size`` / ``num_microbatches``
   and the pipeline group; features the cost model does not describe are refused, naming the
   flag;
2. predicts every pipeline rank's Megatron order (this rank's is the order the runtime checks
   step by step; the others come from :mod:`schedule.megatron`, which reproduces Megatron's);
3. asks the planner (:func:`megatron_offload.planning.auto.plan_auto_offload`, the selection
   ``megatron-offload plan`` prints too) for each rank's fewest units to offload, longest-lived
   first, such that the predicted resident peak stays within the activation budget;
4. logs the plan once, on global rank 0, in Megatron's log style, and returns this rank's set.

Every rank computes every rank's plan from the same inputs, so when the budget cannot be met
on some rank, all ranks raise the same error before the first step (no rank is left waiting
in a p2p receive). With ``--offload-memory-budget-scope device`` the ranks' activation budgets
differ (each subtracts what its own device holds) and are exchanged with one all-gather over
the pipeline group first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megatron_offload.config import OffloadConfig
from megatron_offload.planning.auto import AutoOffloadPlan, plan_auto_offload
from megatron_offload.planning.costmodel import GiB, overhead_bytes, static_bytes, working_bytes
from megatron_offload.planning.job import JobSpec, Recompute
from megatron_offload.schedule.ir import Op

log = logging.getLogger(__name__)

# (TransformerConfig attribute, value that is fine, the Megatron-LM flag): what the cost model
# does not describe. Predictions would be wrong, so policy auto refuses instead of guessing.
_NOT_MODELLED = (
    ("num_moe_experts", None, "--num-experts (MoE layers)"),
    ("multi_latent_attention", False, "--multi-latent-attention"),
    ("mtp_num_layers", None, "--mtp-num-layers"),
    ("num_layers_in_first_pipeline_stage", None, "--decoder-first-pipeline-num-layers"),
    ("num_layers_in_last_pipeline_stage", None, "--decoder-last-pipeline-num-layers"),
    ("pipeline_model_parallel_layout", None, "--pipeline-model-parallel-layout"),
    ("account_for_embedding_in_pipeline_split", False, "--account-for-embedding-in-pipeline-split"),
    ("account_for_loss_in_pipeline_split", False, "--account-for-loss-in-pipeline-split"),
    ("fp8", None, "--fp8-format"),
    ("heterogeneous_block_specs", False, "--heterogeneous-layers-config-path"),
)


class AutoPlanError(ValueError):
    """Policy auto cannot meet --offload-memory-budget-gib (raised before the first step)."""


@dataclass(slots=True)
class AutoDecision:
    """What policy auto chose for one schedule shape on this rank."""

    plan: AutoOffloadPlan
    rank: int
    offload: frozenset
    activation_budget_bytes: float
    job: JobSpec

    def report(self) -> dict:
        """Plain data (picklable) for tests and reports."""
        return {
            "rank": self.rank,
            "offload": sorted(self.offload),
            "activation_budget_bytes": self.activation_budget_bytes,
            "ranks": [choice.as_dict() for choice in self.plan.ranks],
            "unit_bytes": [[u.total for u in row] for row in self.plan.unit_bytes],
            "unit_offloadable_bytes": [
                [u.offloadable for u in row] for row in self.plan.unit_bytes
            ],
            "log": self.plan.log_lines(),
            "notes": list(self.plan.notes),
        }


def _unwrap(chunk):
    """DistributedDataParallel / Float16Module -> the GPT model."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def refuse_unmodelled(config) -> None:
    problems = [flag for attr, fine, flag in _NOT_MODELLED
                if _is_set(getattr(config, attr, fine), fine)]
    if problems:
        raise ValueError(
            "--offload-policy auto predicts activation bytes with a cost model of dense GPT / "
            "Llama layers, which does not describe: " + ", ".join(problems)
            + ". Use --offload-policy full or --offload-policy chunks --offload-chunks K instead"
        )


def _is_set(value, fine) -> bool:
    if fine is None:
        return value is not None and value != 0
    return bool(value) != bool(fine)


def job_from_model(chunks, config, *, seq_length: int, micro_batch_size: int,
                   num_microbatches: int, pp: int, interleaved: bool) -> JobSpec:
    """The cost model's description of the job this rank trains (see the module docstring)."""
    refuse_unmodelled(config)
    models = [_unwrap(chunk) for chunk in chunks]
    model = models[0]
    if not hasattr(model, "decoder") or not hasattr(model, "vocab_size"):
        raise ValueError(
            f"--offload-policy auto models megatron-core's GPTModel; this model is a "
            f"{type(model).__name__}. Use --offload-policy full or chunks"
        )
    layers = [len(m.decoder.layers) for m in models]
    v = len(chunks) if interleaved else 1
    first_layer = next((m.decoder.layers[0] for m in models if len(m.decoder.layers)), None)
    core = getattr(getattr(first_layer, "self_attention", None), "core_attention", None)
    impl = (
        "transformer_engine"
        if core is not None and type(core).__name__.startswith("TE")
        else "local"
    )
    backend = str(getattr(config, "attention_backend", "auto")).split(".")[-1].lower()
    param = next(chunks[0].parameters(), None)
    device = "cuda" if param is not None and param.device.type == "cuda" else "cpu"
    granularity = config.recompute_granularity or "none"
    recompute = Recompute(
        granularity=granularity,
        modules=tuple(config.recompute_modules or ("core_attn",)),
        method=config.recompute_method or "uniform",
        num_layers=config.recompute_num_layers or 1,
    )
    groups = config.num_query_groups
    job = JobSpec(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        seq_length=seq_length,
        ffn_hidden_size=config.ffn_hidden_size,
        num_query_groups=None if groups in (None, config.num_attention_heads) else groups,
        kv_channels=config.kv_channels,
        micro_batch_size=micro_batch_size,
        global_batch_size=micro_batch_size * num_microbatches,
        padded_vocab_size=model.vocab_size,
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        virtual_stages=v,
        context_parallel_size=config.context_parallel_size,
        sequence_parallel=bool(config.sequence_parallel),
        swiglu=bool(config.gated_linear_unit),
        normalization=config.normalization,
        add_bias_linear=bool(config.add_bias_linear),
        position_embedding_type=getattr(model, "position_embedding_type", "learned_absolute"),
        untie_embeddings_and_output_weights=not getattr(
            model, "share_embeddings_and_output_weights", True
        ),
        hidden_dropout=float(config.hidden_dropout),
        attention_dropout=float(config.attention_dropout),
        attention_softmax_in_fp32=bool(config.attention_softmax_in_fp32),
        dtype="bf16" if config.bf16 else "fp16" if config.fp16 else "fp32",
        transformer_impl=impl,
        flash_attention=impl == "transformer_engine" and backend not in ("unfused", "local"),
        bias_activation_fusion=bool(config.bias_activation_fusion),
        rope_fusion=bool(config.apply_rope_fusion),
        masked_softmax_fusion=bool(config.masked_softmax_fusion),
        device=device,
        recompute=recompute,
        distribute_saved_activations=bool(config.distribute_saved_activations),
        microbatch_group_size_per_vp_stage=(
            config.microbatch_group_size_per_vp_stage if interleaved else None
        ),
    )
    if any(n != job.layers_per_chunk for n in layers):
        raise ValueError(
            f"--offload-policy auto models layers split evenly over the pipeline (here "
            f"{job.layers_per_chunk} per model chunk), but this rank's chunks hold {layers} "
            "layers; use --offload-policy full or chunks"
        )
    return job


def rank_orders(name: str, own: Op, own_rank: int, job: JobSpec, num_microbatches: int,
                group_size: int | None):
    """Every pipeline rank's order (``own`` for this rank) and a note when only this rank's
    could be predicted."""
    from megatron_offload.schedule.megatron import megatron_order

    p, v = job.pp, job.vpp
    if name == "forward_backward_no_pipelining" or p == 1:
        return {own_rank: own}, []
    kind = "interleaved" if name == "forward_backward_pipelining_with_interleaving" else "1f1b"
    try:
        orders = {r: megatron_order(kind, p, r, v, num_microbatches, group_size) for r in range(p)}
    except ValueError as error:
        return {own_rank: own}, [
            f"other ranks' orders not predicted ({error}); planned this rank only"
        ]
    if orders[own_rank] != list(own):
        return {own_rank: own}, [
            "this megatron-core's order differs from schedule.megatron's; planned this rank only"
        ]
    return orders, []


def device_activation_budget(budget_bytes: float, *, allocated_bytes: float,
                             static_predicted_bytes: float, working_bytes_: float,
                             reserve_bytes: float) -> float:
    """``--offload-memory-budget-scope device``: what is left for resident activations of a
    device budget: minus the larger of what the device holds at the first training call and
    the predicted parameters + gradients + optimizer state (Adam's moments are usually
    allocated at the first optimizer step, after this call), minus the predicted working
    memory of a backward, minus the reserve."""
    return (
        budget_bytes - max(allocated_bytes, static_predicted_bytes) - working_bytes_ - reserve_bytes
    )


def _activation_budgets(config: OffloadConfig, job: JobSpec, chunks, rank: int,
                        group) -> list[float] | float:
    budget = float(config.memory_budget_bytes)
    if config.memory_budget_scope == "activations":
        return budget
    param = next(chunks[0].parameters(), None)
    if param is None or param.device.type != "cuda":
        raise ValueError(
            "--offload-memory-budget-scope device counts GPU memory (torch.cuda.memory_allocated); "
            "this model is not on a GPU: use --offload-memory-budget-scope activations"
        )
    ddp = getattr(chunks[0], "ddp_config", None)
    from megatron.core import parallel_state

    # Static state as the cost model predicts it (the distributed optimizer shards over the
    # data-parallel x context-parallel ranks); Adam assumed.
    static_job = job.with_changes(
        data_parallel_size=parallel_state.get_data_parallel_world_size(), global_batch_size=None,
        use_distributed_optimizer=bool(getattr(ddp, "use_distributed_optimizer", False)),
        accumulate_allreduce_grads_in_fp32=bool(getattr(ddp, "grad_reduce_in_fp32", False)),
    )
    own = device_activation_budget(
        budget, allocated_bytes=torch.cuda.memory_allocated(param.device),
        static_predicted_bytes=static_bytes(static_job, rank).total,
        working_bytes_=working_bytes(job, rank), reserve_bytes=config.memory_reserve_gib * GiB)
    if job.pp == 1:
        return [own]
    gathered = [torch.zeros(1, dtype=torch.float64, device=param.device) for _ in range(job.pp)]
    torch.distributed.all_gather(
        gathered, torch.tensor([own], dtype=torch.float64, device=param.device), group=group
    )
    return [float(t.item()) for t in gathered]


def auto_offload_units(runtime, name: str, kwargs, config, chunks, order, group) -> frozenset:
    """This rank's offload set under policy auto (cached per schedule shape); raises
    :class:`AutoPlanError` before the first step when the budget cannot be met."""
    offload_config: OffloadConfig = runtime.config
    interleaved = name == "forward_backward_pipelining_with_interleaving"
    m = kwargs["num_microbatches"]
    key = (name, m, kwargs.get("seq_length"), kwargs.get("micro_batch_size"), len(chunks))
    decision = runtime.auto.get(key)
    if decision is not None:
        return decision.offload
    pp = 1 if group is None else group.size()
    rank = order.rank
    job = job_from_model(chunks, config, seq_length=kwargs["seq_length"],
                         micro_batch_size=kwargs["micro_batch_size"], num_microbatches=m, pp=pp,
                         interleaved=interleaved)
    group_size = (config.microbatch_group_size_per_vp_stage or pp) if interleaved else None
    orders, notes = rank_orders(name, order.ops, rank, job, m, group_size)
    budgets = _activation_budgets(offload_config, job, chunks, rank, group)
    ranks = sorted(orders)
    overheads = [overhead_bytes(job, r) for r in range(job.pp)]
    plan = plan_auto_offload(job, orders, budgets,
                             prefetch_distance=offload_config.unit_prefetch_distance,
                             min_offload_bytes=offload_config.min_offload_bytes,
                             overhead_bytes=overheads, ranks=ranks)
    plan.notes += notes
    mine = next(choice for choice in plan.ranks if choice.rank == rank)
    if not plan.fits:
        raise AutoPlanError(plan.does_not_fit_message())
    decision = AutoDecision(plan=plan, rank=rank, offload=mine.offload,
                            activation_budget_bytes=mine.budget_bytes, job=job)
    runtime.auto[key] = decision
    _log_once(decision, offload_config)
    return decision.offload


def _log_once(decision: AutoDecision, config: OffloadConfig) -> None:
    lines = decision.plan.log_lines()
    scope = (
        "" if config.memory_budget_scope == "activations"
        else " (device budget minus static, working and reserve memory)"
    )
    header = ("> megatron-offload auto plan: "
              f"--offload-memory-budget-gib {config.memory_budget_gib:g}{scope}, "
              f"units of {decision.job.layers_per_chunk} layer(s), bytes from the cost model")
    for line in [header, *lines,
                 *(f"> megatron-offload auto plan: note: {n}" for n in decision.plan.notes)]:
        log.info(line)
    global_rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if global_rank == 0:  # Megatron's print_rank_0
        print("\n".join([header, *lines]), flush=True)
