"""A tiny GPT on megatron-core's own ``GPTModel`` (local spec: no Transformer Engine, no apex).

``TinyGPTCase`` describes one run (model size, pipeline layout, schedule flags, seed);
``build_model(case)`` builds the model chunks of this rank the way Megatron-LM's training
does (one ``GPTModel`` per virtual stage with its ``vp_stage``, each wrapped in Megatron's
``DistributedDataParallel``, ``config.no_sync_func`` / ``finalize_model_grads_func`` set).

Weights do not depend on the layout: every parameter with two or more dimensions is drawn
from a generator seeded by ``(case.seed, its global name)``, where the global name uses the
global layer index (``decoder.layers.<layer_number - 1>``) and a tied output weight takes
the word embedding's name. One-dimensional parameters keep megatron-core's constant init
(norm weights 1, biases 0). Synthetic data is a function of
``(seed, iteration, dp rank, microbatch)`` only.

Besides the defaults (fp32, learned positions, LayerNorm + GELU MLP, plain SGD on
``main_grad``, no overlapped communication), a case can switch on what real Megatron-LM GPU
jobs use: ``gradient_accumulation_fusion`` (the CPU shims stand in for the CUDA extension),
``overlap_grad_reduce`` / ``overlap_param_gather`` / ``use_distributed_optimizer`` with
``config.grad_sync_func`` / ``param_sync_func`` set as Megatron-LM's ``training.py`` sets
them, a real ``megatron.core.optimizer`` Adam (``optimizer="adam"``), bf16 with fp32 main
params (``Float16Module``), a Llama-style layer (RoPE, SwiGLU, GQA, RMSNorm, no biases),
selective recompute of chosen modules, variable sequence length between iterations, and
MoE layers (SequentialMLP, EP = 1).

Everything here runs inside a pool worker after ``dist.init_process_group`` and needs the
CPU shims on a machine without CUDA (``reference.run_case`` applies them).
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, fields
from typing import Literal

import torch

Recompute = Literal["full", "selective"]
Optimizer = Literal["sgd", "adam"]
_RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "shared_experts")


@dataclass(kw_only=True, slots=True)
class TinyGPTCase:
    pp: int = 1
    """Pipeline-parallel size. The data-parallel size is world_size / pp."""

    vpp: int | None = None
    """Virtual pipeline stages per rank (model chunks); None = no interleaving."""

    microbatches: int = 8
    """Microbatches per iteration per data-parallel rank."""

    num_layers: int = 8
    """Transformer layers in the whole model; must divide by pp * (vpp or 1)."""

    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None
    """None = 4 * hidden_size."""

    seq_length: int = 32
    micro_batch_size: int = 2
    vocab_size: int = 128

    tie_embeddings: bool = False
    """share_embeddings_and_output_weights. With PP > 1 the first and last stage each hold
    a copy, kept equal by finalize_model_grads' embedding all-reduce."""

    recompute: Recompute | None = None
    """None, "full" (uniform, 1 layer per unit) or "selective" (core attention)."""

    overlap_p2p_comm: bool | None = None
    """None = Megatron-LM's default: True with interleaving, False without."""

    batch_p2p_comm: bool | None = None
    """None = Megatron-LM's default: not overlap_p2p_comm. (batch_p2p_comm with PP=2 + VPP
    gives wrong gradients on gloo: Trap 1 of the CPU notes.)"""

    deallocate_pipeline_outputs: bool = True
    """Megatron-LM sets this True; needs the Trap 2 shim with overlap_p2p_comm on gloo."""

    seed: int = 1234

    lr: float = 0.01
    """Learning rate: of the harness's plain SGD step on main_grad (``optimizer="sgd"``) or
    of megatron-core's Adam (``optimizer="adam"``; real jobs use ~1e-3)."""

    # --- what real Megatron-LM GPU jobs switch on (all off by default) ------------------------
    recompute_modules: tuple[str, ...] | None = None
    """With ``recompute="selective"``: ``TransformerConfig.recompute_modules`` (e.g.
    ("layernorm",), which uses ``CheckpointWithoutOutput``). None = Megatron's default,
    ("core_attn",)."""

    seq_lengths: tuple[int, ...] | None = None
    """Sequence length per iteration, cycling (e.g. (32, 48, 32)); None = ``seq_length``
    in every iteration. Each iteration's length is passed to the schedule as its
    ``seq_length``; position tables are sized for the longest."""

    bf16: bool = False
    """bf16 params and activations (``Float16Module``), fp32 gradient buffers
    (``grad_reduce_in_fp32``, as Megatron-LM forces for bf16), fp32 main params in the
    optimizer. Needs ``optimizer="adam"``."""

    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"
    """"rope": rotary embeddings (unfused: ``apply_rope_fusion=False`` on CPU)."""

    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    swiglu: bool = False
    """``gated_linear_unit=True`` with SiLU (SwiGLU MLP)."""

    num_query_groups: int | None = None
    """GQA: fewer key/value groups than heads; None = one per head (plain MHA)."""

    add_bias_linear: bool = True
    """False for a Llama-style layer (no biases in linear layers)."""

    num_moe_experts: int | None = None
    """MoE MLP in every layer with this many experts (SequentialMLP, no grouped GEMM,
    expert-parallel size 1, allgather token dispatcher (Megatron-LM's default; "alltoall"
    needs a CUDA stream), aux-loss load balancing)."""

    moe_router_topk: int = 2

    gradient_accumulation_fusion: bool = False
    """Megatron's fused wgrad accumulation into ``main_grad`` (apex's
    ``fused_weight_gradient_mlp_cuda``; on CPU the shims provide a stand-in)."""

    overlap_grad_reduce: bool = False
    """Megatron DDP overlaps the grad all-reduce / reduce-scatter with backward;
    ``config.no_sync_func`` and ``config.grad_sync_func`` set as Megatron-LM does
    (``align_grad_reduce`` default)."""

    use_distributed_optimizer: bool = False
    """Megatron's DistributedOptimizer (ZeRO-1: grads reduce-scattered, params
    all-gathered). Needs ``optimizer="adam"``."""

    overlap_param_gather: bool = False
    """Param all-gather overlapped with the next forward (forward pre-hooks; with
    ``align_param_gather`` also ``config.param_sync_func``). Needs the distributed
    optimizer. As Megatron-LM's training loop does, the pre-hooks are off for the first
    iteration and switched on after its optimizer step."""

    align_param_gather: bool = True
    """Megatron-LM's default (``--no-align-param-gather`` turns it off)."""

    ddp_bucket_size: int | None = None
    """Megatron DDP bucket size in elements; None = DDP's default (one bucket per chunk at
    this model size). A small value gives several buckets per chunk, so that buckets are
    reduced while backward still runs (with ``overlap_grad_reduce``)."""

    optimizer: Optimizer = "sgd"
    """"sgd": the harness's plain SGD step on ``main_grad`` (old default). "adam":
    ``megatron.core.optimizer.get_megatron_optimizer`` with ``OptimizerConfig(optimizer=
    "adam", lr=lr, clip_grad=clip_grad, ...)``; its returned grad norm is recorded."""

    clip_grad: float = 1.0
    """Gradient clipping of megatron-core's optimizer (``optimizer="adam"``)."""

    microbatch_group_size: int | None = None
    """Megatron's ``microbatch_group_size_per_vp_stage`` (interleaving only); None = its
    default, pp. Megatron needs pp <= g <= m and m % g in {0} or >= pp."""

    def __post_init__(self) -> None:
        if self.pp < 1:
            raise ValueError(f"TinyGPTCase {self.pp=} must be >= 1")
        if self.vpp is not None:
            if self.vpp < 2:
                raise ValueError(f"TinyGPTCase {self.vpp=} must be None (no interleaving) or >= 2")
            if self.pp < 2:
                raise ValueError(f"TinyGPTCase {self.vpp=} needs pp >= 2 (got {self.pp=})")
        stages = self.pp * (self.vpp or 1)
        if self.num_layers % stages:
            raise ValueError(
                f"TinyGPTCase {self.num_layers=} must divide by pp * vpp = {stages}"
            )
        if self.recompute not in (None, "full", "selective"):
            raise ValueError(f"TinyGPTCase {self.recompute=} must be None, 'full' or 'selective'")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"TinyGPTCase {self.hidden_size=} must divide by {self.num_attention_heads=}"
            )
        if self.microbatches < 1:
            raise ValueError(f"TinyGPTCase {self.microbatches=} must be >= 1")
        if self.overlap_p2p_comm and self.batch_p2p_comm:
            raise ValueError("TinyGPTCase: overlap_p2p_comm and batch_p2p_comm exclude each other")
        if self.overlap_p2p_comm and self.vpp is None:
            raise ValueError(
                "TinyGPTCase overlap_p2p_comm=True needs vpp (megatron-core overlaps p2p only "
                "in the interleaved schedule)"
            )
        if self.recompute_modules is not None:
            if self.recompute != "selective":
                raise ValueError(
                    f"TinyGPTCase {self.recompute_modules=} needs recompute='selective'"
                )
            bad = set(self.recompute_modules) - set(_RECOMPUTE_MODULES)
            if bad or not self.recompute_modules:
                raise ValueError(
                    f"TinyGPTCase {self.recompute_modules=}: choose from {_RECOMPUTE_MODULES}"
                )
        if (self.recompute_modules and "mlp" in self.recompute_modules and self.add_bias_linear
                and self.num_moe_experts is None):
            # megatron-core 0.16.1: TransformerLayer runs tensor_parallel.checkpoint(self.mlp)
            # and MLP returns (output, linear_fc2.bias) (skip_bias_add). The bias Parameter
            # comes out of CheckpointFunction with a grad_fn, and the recompute in backward
            # returns it again, so backward recurses into CheckpointFunctionBackward without
            # end (memory grows until the process is killed).
            raise ValueError(
                "TinyGPTCase recompute_modules 'mlp' needs add_bias_linear=False: with biases "
                "megatron-core 0.16.1 recurses without end in CheckpointFunction.backward "
                "(the fc2 bias Parameter is returned through the checkpoint)"
            )
        if self.num_moe_experts is not None and self.add_bias_linear:
            # megatron-core 0.16.1 SequentialMLP expert with biases and TP = 1: MLP.forward's
            # ``output += output_bias * per_token_scale`` writes in place into the output of
            # _ReduceFromModelParallelRegion, which returns its input as-is at TP = 1.
            raise ValueError(
                "TinyGPTCase num_moe_experts needs add_bias_linear=False: with biases "
                "megatron-core 0.16.1's expert MLP fails at TP=1 ('Output 0 of "
                "_ReduceFromModelParallelRegion is a view and is being modified inplace')"
            )
        if self.seq_lengths is not None and (
            not self.seq_lengths or any(n < 1 for n in self.seq_lengths)
        ):
            raise ValueError(f"TinyGPTCase {self.seq_lengths=} must be positive lengths")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"TinyGPTCase {self.optimizer=} must be 'sgd' or 'adam'")
        if self.optimizer == "sgd":
            for flag in ("bf16", "use_distributed_optimizer"):
                if getattr(self, flag):
                    raise ValueError(
                        f"TinyGPTCase {flag}=True needs optimizer='adam' (megatron-core's "
                        "optimizer keeps the fp32 main params / the parameter shards)"
                    )
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError(
                "TinyGPTCase overlap_param_gather=True needs use_distributed_optimizer=True"
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"TinyGPTCase {self.num_attention_heads=} must divide by {self.num_query_groups=}"
            )
        if self.position_embedding_type not in ("learned_absolute", "rope"):
            raise ValueError(f"TinyGPTCase {self.position_embedding_type=} not supported")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"TinyGPTCase {self.normalization=} not supported")
        if (self.num_moe_experts is not None
                and not 1 <= self.moe_router_topk <= self.num_moe_experts):
            raise ValueError(
                f"TinyGPTCase {self.moe_router_topk=} must lie in 1..{self.num_moe_experts=}"
            )

    @property
    def num_chunks(self) -> int:
        return self.vpp or 1

    @property
    def p2p_overlap(self) -> bool:
        """overlap_p2p_comm after applying Megatron-LM's default."""
        if self.overlap_p2p_comm is not None:
            return self.overlap_p2p_comm
        return self.vpp is not None

    @property
    def p2p_batch(self) -> bool:
        """batch_p2p_comm after applying Megatron-LM's default."""
        if self.batch_p2p_comm is not None:
            return self.batch_p2p_comm
        return not self.p2p_overlap

    def seq_length_at(self, iteration: int) -> int:
        """The sequence length of ``iteration`` (``seq_lengths`` cycles)."""
        if self.seq_lengths is None:
            return self.seq_length
        return self.seq_lengths[iteration % len(self.seq_lengths)]

    @property
    def max_seq_length(self) -> int:
        return max(self.seq_lengths) if self.seq_lengths is not None else self.seq_length

    @property
    def megatron_optimizer(self) -> bool:
        """Whether the runner steps with megatron-core's optimizer (not the plain SGD)."""
        return self.optimizer != "sgd"

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def label(self) -> str:
        s = f"pp{self.pp}" + (f"vpp{self.vpp}" if self.vpp else "") + f"-m{self.microbatches}"
        if self.recompute:
            s += f"-rc{self.recompute}"
        if self.recompute_modules:
            s += "[" + "+".join(self.recompute_modules) + "]"
        if self.tie_embeddings:
            s += "-tied"
        if self.bf16:
            s += "-bf16"
        if self.position_embedding_type == "rope" or self.swiglu or self.num_query_groups:
            s += "-llama"
        if self.num_moe_experts:
            s += f"-moe{self.num_moe_experts}"
        if self.seq_lengths:
            s += "-seq" + "/".join(map(str, self.seq_lengths))
        if self.gradient_accumulation_fusion:
            s += "-fusion"
        if self.overlap_grad_reduce:
            s += "-ogr"
        if self.use_distributed_optimizer:
            s += "-distopt"
        if self.overlap_param_gather:
            s += "-opg" + ("" if self.align_param_gather else "-unaligned")
        if self.optimizer != "sgd":
            s += f"-{self.optimizer}"
        return s


# --- config and model -----------------------------------------------------------------------

def transformer_config(case: TinyGPTCase):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    recompute = {}
    if case.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1)
    elif case.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
        if case.recompute_modules is not None:
            recompute["recompute_modules"] = list(case.recompute_modules)
    dtype = torch.bfloat16 if case.bf16 else torch.float32
    extra = {}
    if case.swiglu:
        extra.update(gated_linear_unit=True, activation_func=F.silu)
    if case.num_query_groups is not None:
        extra["num_query_groups"] = case.num_query_groups
    if case.num_moe_experts is not None:
        extra.update(
            num_moe_experts=case.num_moe_experts,
            moe_router_topk=case.moe_router_topk,
            moe_ffn_hidden_size=case.ffn_hidden_size or 4 * case.hidden_size,
            moe_grouped_gemm=False,
            # megatron-core 0.16.1 "alltoall" builds a torch.cuda.Stream() in its
            # __init__ (token_dispatcher.py:445): Megatron-LM's default "allgather" runs on CPU
            moe_token_dispatcher_type="allgather",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=1e-2,
            expert_model_parallel_size=1,
        )
    return TransformerConfig(
        num_layers=case.num_layers,
        hidden_size=case.hidden_size,
        num_attention_heads=case.num_attention_heads,
        ffn_hidden_size=case.ffn_hidden_size or 4 * case.hidden_size,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=case.pp,
        virtual_pipeline_model_parallel_size=case.vpp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=case.bf16,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization=case.normalization,
        add_bias_linear=case.add_bias_linear,
        # fusions go through torch.compile / CUDA kernels: off on CPU
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        # gradient_accumulation_fusion runs the CPU stand-in of the CUDA extension
        gradient_accumulation_fusion=case.gradient_accumulation_fusion,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        overlap_p2p_comm=case.p2p_overlap,
        batch_p2p_comm=case.p2p_batch,
        deallocate_pipeline_outputs=case.deallocate_pipeline_outputs,
        **({} if case.microbatch_group_size is None
           else {"microbatch_group_size_per_vp_stage": case.microbatch_group_size}),
        **recompute,
        **extra,
    )


def global_layer_map(chunk) -> dict[int, int]:
    """local index in ``decoder.layers`` -> global layer index (``layer_number - 1``)."""
    module = unwrap(chunk)
    return {i: layer.layer_number - 1 for i, layer in enumerate(module.decoder.layers)}


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_param_names(chunk, *, tied: bool) -> dict[str, torch.nn.Parameter]:
    """Parameters of one chunk by layout-independent name.

    ``module.`` wrappers are stripped, ``decoder.layers.<local>`` becomes
    ``decoder.layers.<global>``, and a tied ``output_layer.weight`` (last stage with PP > 1)
    is named ``embedding.word_embeddings.weight``, as the one shared weight is with PP = 1.
    """
    module = unwrap(chunk)
    layer_map = global_layer_map(module)
    out = {}
    for name, param in module.named_parameters():
        m = _LAYER_RE.match(name)
        if m:
            name = f"decoder.layers.{layer_map[int(m.group(1))]}." + name[m.end():]
        if tied and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"
        out[name] = param
    return out


def unwrap(chunk):
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


@torch.no_grad()
def init_weights(chunk, case: TinyGPTCase, std: float = 0.02) -> None:
    """Layout-independent init: each >= 2-D parameter from a generator seeded by its name."""
    for name, param in global_param_names(chunk, tied=case.tie_embeddings).items():
        if param.dim() < 2:
            continue
        gen = torch.Generator().manual_seed(_name_seed(case.seed, name))
        param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def ddp_config(case: TinyGPTCase):
    """Megatron DDP settings of ``case`` (as Megatron-LM builds them from its arguments)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        # Megatron-LM forces fp32 grad accumulation / reduction for bf16
        grad_reduce_in_fp32=case.bf16,
        overlap_grad_reduce=case.overlap_grad_reduce,
        overlap_param_gather=case.overlap_param_gather,
        align_param_gather=case.align_param_gather,
        use_distributed_optimizer=case.use_distributed_optimizer,
        bucket_size=case.ddp_bucket_size,
    )


def build_model(case: TinyGPTCase) -> list:
    """This rank's model chunks, wrapped in megatron-core's DistributedDataParallel.

    Requires parallel state initialized for ``case`` (``reference.init_parallel_state``).
    One ``GPTModel`` per virtual stage (in ``Float16Module`` with ``case.bf16``), each in
    Megatron DDP (bucketing disabled for chunks > 0, as Megatron-LM does). Sets on the shared
    TransformerConfig: ``no_sync_func`` (one per chunk), ``finalize_model_grads_func``, and,
    like Megatron-LM's ``training.py``, ``grad_sync_func = start_grad_sync`` with
    ``overlap_grad_reduce`` and ``param_sync_func = start_param_sync`` with
    ``overlap_param_gather`` and ``align_param_gather`` (None otherwise). The runner sets
    ``grad_scale_func`` once it has built the optimizer.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    config = transformer_config(case)
    spec = get_gpt_layer_local_spec(
        num_experts=case.num_moe_experts, moe_grouped_gemm=False,
        normalization=case.normalization,
    )
    chunks = []
    for vp_stage in range(case.num_chunks):
        vp = vp_stage if case.vpp is not None else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=case.vocab_size,
            max_sequence_length=case.max_seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=case.tie_embeddings,
            position_embedding_type=case.position_embedding_type,
            vp_stage=vp,
        )
        init_weights(model, case)
        if case.bf16:
            model = Float16Module(config, model)
        chunks.append(model)

    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config(case), module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    no_sync = [m.no_sync for m in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.grad_sync_func = None
    config.param_sync_func = None
    if case.overlap_grad_reduce:  # Megatron-LM: align_grad_reduce (default True)
        grad_sync = [m.start_grad_sync for m in wrapped]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if case.overlap_param_gather and case.align_param_gather:
        param_sync = [m.start_param_sync for m in wrapped]
        config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


# --- data ---------------------------------------------------------------------------------

def causal_mask(seq_length: int) -> torch.Tensor:
    """[1, 1, s, s] bool, True = masked (future positions), as Megatron-LM passes it."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1)[None, None]


def synthetic_batch(case: TinyGPTCase, *, iteration: int, dp_rank: int, microbatch: int) -> dict:
    """Deterministic tokens/labels for (seed, iteration, dp rank, microbatch).

    Each row counts through the vocabulary from a random start with a random stride in 1..3
    (modulo the vocabulary size), so the next token is learnable from the previous two and a
    training run shows its loss falling, unlike uniform random tokens. The length is
    ``case.seq_length_at(iteration)``.
    """
    key = f"data/{iteration}/{dp_rank}/{microbatch}"
    gen = torch.Generator().manual_seed(_name_seed(case.seed, key))
    rows = case.micro_batch_size
    length = case.seq_length_at(iteration)
    start = torch.randint(0, case.vocab_size, (rows, 1), generator=gen)
    stride = torch.randint(1, 4, (rows, 1), generator=gen)
    seq = (start + stride * torch.arange(length + 1)) % case.vocab_size
    return {
        "tokens": seq[:, :-1].contiguous(),
        "labels": seq[:, 1:].contiguous(),
        "position_ids": torch.arange(length).unsqueeze(0).expand(
            case.micro_batch_size, -1).contiguous(),
        "attention_mask": causal_mask(length),
    }


__all__ = [
    "TinyGPTCase", "transformer_config", "ddp_config", "build_model", "init_weights",
    "global_param_names", "global_layer_map", "synthetic_batch", "causal_mask", "unwrap",
]
