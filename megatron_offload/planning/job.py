"""The job: a Megatron GPT / Llama-style training job as its Megatron-LM flags describe it.

:class:`JobSpec` holds the flags (field names are Megatron-LM's, defaults too) and the sizes
derived from them; :class:`Recompute` is Megatron's activation recomputation. Validation raises
ValueError naming the flag and the fix. The bytes, FLOPs and times of a job are in
:mod:`megatron_offload.planning.costmodel`. Pure Python: nothing imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Dtype = Literal["bf16", "fp16", "fp32"]
Normalization = Literal["LayerNorm", "RMSNorm"]
PositionEmbedding = Literal["learned_absolute", "rope", "none"]
TransformerImpl = Literal["transformer_engine", "local"]
Device = Literal["cuda", "cpu"]
Granularity = Literal["none", "selective", "full"]
RecomputeMethod = Literal["uniform", "block"]

RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")
"""The dense-layer modules of Megatron's ``--recompute-modules`` this model knows. Others
(moe, moe_act, shared_experts, mla_up_proj) concern layers this model does not describe."""


@dataclass(kw_only=True, frozen=True, slots=True)
class Recompute:
    """Megatron's activation recomputation (``--recompute-granularity`` and friends)."""

    granularity: Granularity = "none"
    """``none``, ``selective`` (``--recompute-granularity selective``: the modules below run
    again in the backward) or ``full`` (whole layers; only their input is kept)."""
    modules: tuple[str, ...] = ("core_attn",)
    """``--recompute-modules`` for selective (Megatron's default: core_attn)."""
    method: RecomputeMethod = "uniform"
    """``--recompute-method`` for full: ``uniform`` (groups of N layers, each keeps its input)
    or ``block`` (the first N layers of each chunk keep only their input, the rest all)."""
    num_layers: int = 1
    """``--recompute-num-layers`` N for full recompute."""

    def __post_init__(self) -> None:
        if self.granularity not in ("none", "selective", "full"):
            raise ValueError(f"--recompute-granularity {self.granularity!r}: "
                             "choose full or selective")
        if self.granularity == "selective":
            unknown = sorted(set(self.modules) - set(RECOMPUTE_MODULES)
                             - {"moe", "moe_act", "shared_experts", "mla_up_proj"})
            if unknown:
                raise ValueError(f"--recompute-modules {' '.join(unknown)}: not a Megatron module; "
                                 f"choose from {' '.join(RECOMPUTE_MODULES)}")
        if self.granularity == "full":
            if self.method not in ("uniform", "block"):
                raise ValueError(f"--recompute-method {self.method!r}: choose uniform or block")
            if self.num_layers < 1:
                raise ValueError(f"--recompute-num-layers {self.num_layers} must be >= 1")

    def has(self, module: str) -> bool:
        return self.granularity == "selective" and module in self.modules

    @property
    def label(self) -> str:
        if self.granularity == "none":
            return "none"
        if self.granularity == "selective":
            return "selective(" + ",".join(self.modules) + ")"
        return f"full({self.method},{self.num_layers})"

    def megatron_flags(self) -> list[str]:
        """The Megatron-LM flags that select this recomputation."""
        if self.granularity == "none":
            return []
        if self.granularity == "selective":
            return ["--recompute-granularity", "selective", "--recompute-modules", *self.modules]
        return ["--recompute-granularity", "full", "--recompute-method", self.method,
                "--recompute-num-layers", str(self.num_layers)]


NO_RECOMPUTE = Recompute()


@dataclass(kw_only=True, frozen=True, slots=True)
class JobSpec:
    """A Megatron GPT / Llama-style training job, as its Megatron-LM flags describe it.

    Field names follow Megatron-LM's flags (``--num-layers`` -> ``num_layers``);
    :meth:`from_megatron_args` reads Megatron-LM's own parsed ``args`` namespace. Defaults are
    Megatron-LM's. Validation raises ValueError naming the flag and the fix.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    ffn_hidden_size: int | None = None
    """None: Megatron-LM's default, 4h, or int(8h/3 / 64) * 64 with --swiglu."""
    num_query_groups: int | None = None
    """GQA key/value groups (``--num-query-groups`` with ``--group-query-attention``);
    None = heads."""
    kv_channels: int | None = None
    """Head dimension; None = hidden / heads."""
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    """None: Megatron-LM's default, micro batch x data-parallel size (one microbatch)."""
    vocab_size: int = 50257
    """Tokenizer vocabulary (``--vocab-size``); padded as Megatron does unless
    ``padded_vocab_size`` is given."""
    padded_vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int | None = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_stages: int = 1
    """Model chunks per pipeline rank v (``--num-virtual-stages-per-pipeline-rank``, or
    layers / (p x ``--num-layers-per-virtual-pipeline-stage``)); 1 = no interleaving."""
    context_parallel_size: int = 1
    data_parallel_size: int = 1
    sequence_parallel: bool = False
    swiglu: bool = False
    normalization: Normalization = "LayerNorm"
    add_bias_linear: bool = True
    position_embedding_type: PositionEmbedding = "learned_absolute"
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_softmax_in_fp32: bool = False
    dtype: Dtype = "fp32"
    """Parameter / activation dtype: ``--bf16``, ``--fp16``, else fp32."""
    transformer_impl: TransformerImpl = "transformer_engine"
    flash_attention: bool = True
    """Fused / flash attention (no s x s tensors kept). Transformer Engine's default
    (``--attention-backend auto|flash|fused``); False for ``--attention-backend unfused`` and
    always False with ``--transformer-impl local`` (megatron-core's DotProductAttention)."""
    bias_activation_fusion: bool = True
    """``--no-bias-gelu-fusion`` / ``--no-bias-swiglu-fusion`` turn it off."""
    rope_fusion: bool = True
    """``--no-rope-fusion`` turns it off (unfused RoPE keeps cos/sin tables per layer)."""
    masked_softmax_fusion: bool = True
    """``--no-masked-softmax-fusion`` turns it off (only matters for unfused attention)."""
    device: Device = "cuda"
    """``cpu``: the job runs on CPU (tests): torch's CPU dropout keeps a d-byte mask instead of a
    1-byte one and CPU LayerNorm keeps its statistics in d bytes instead of fp32."""
    recompute: Recompute = NO_RECOMPUTE
    distribute_saved_activations: bool = False
    use_distributed_optimizer: bool = False
    accumulate_allreduce_grads_in_fp32: bool | None = None
    """None: Megatron-LM's default (True with --bf16)."""
    optimizer: Literal["adam", "sgd"] = "adam"
    microbatch_group_size_per_vp_stage: int | None = None
    """Megatron's microbatch group size g for the interleaved schedule; None = p."""

    def __post_init__(self) -> None:
        def positive(flag: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} {value!r} must be a positive integer")

        for flag, value in (
            ("--num-layers", self.num_layers), ("--hidden-size", self.hidden_size),
            ("--num-attention-heads", self.num_attention_heads), ("--seq-length", self.seq_length),
            ("--micro-batch-size", self.micro_batch_size),
            ("--tensor-model-parallel-size", self.tensor_model_parallel_size),
            ("--pipeline-model-parallel-size", self.pipeline_model_parallel_size),
            ("--num-virtual-stages-per-pipeline-rank", self.virtual_stages),
            ("--context-parallel-size", self.context_parallel_size),
            ("--data-parallel-size", self.data_parallel_size),
            ("--vocab-size", self.vocab_size),
        ):
            positive(flag, value)
        for flag, value in (("--ffn-hidden-size", self.ffn_hidden_size),
                            ("--num-query-groups", self.num_query_groups),
                            ("--kv-channels", self.kv_channels),
                            ("--global-batch-size", self.global_batch_size),
                            ("--padded-vocab-size", self.padded_vocab_size),
                            ("--microbatch-group-size-per-virtual-pipeline-stage",
                             self.microbatch_group_size_per_vp_stage)):
            if value is not None:
                positive(flag, value)
        t, p, v = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                   self.virtual_stages)
        if self.num_layers % (p * v):
            raise ValueError(f"--num-layers {self.num_layers} must divide by "
                             f"--pipeline-model-parallel-size x virtual stages = {p} x {v}; e.g. "
                             f"--num-layers {p * v * max(1, round(self.num_layers / (p * v)))}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"--hidden-size {self.hidden_size} must divide by "
                             f"--num-attention-heads {self.num_attention_heads} (or "
                             "give --kv-channels)")
        if self.num_attention_heads % self.query_groups:
            raise ValueError(f"--num-attention-heads {self.num_attention_heads} must divide by "
                             f"--num-query-groups {self.query_groups}")
        if self.num_attention_heads % t or self.query_groups % t:
            raise ValueError(f"--num-attention-heads {self.num_attention_heads} and "
                             f"--num-query-groups {self.query_groups} must divide by "
                             f"--tensor-model-parallel-size {t}")
        if self.ffn % t:
            raise ValueError(f"--ffn-hidden-size {self.ffn} must divide by "
                             f"--tensor-model-parallel-size {t}")
        if self.seq_length % (self.context_parallel_size * (t if self.sequence_parallel else 1)):
            raise ValueError(f"--seq-length {self.seq_length} must divide by "
                             "--context-parallel-size x (tensor-parallel "
                             "size with --sequence-parallel) = "
                             f"{self.context_parallel_size * (t if self.sequence_parallel else 1)}")
        if (self.global_batch_size is not None
                and self.global_batch_size % (self.micro_batch_size * self.data_parallel_size)):
            raise ValueError(f"--global-batch-size {self.global_batch_size} must divide by "
                             f"--micro-batch-size x data-parallel size = {self.micro_batch_size} x "
                             f"{self.data_parallel_size}")
        if not 0 <= self.hidden_dropout < 1 or not 0 <= self.attention_dropout < 1:
            raise ValueError(f"--hidden-dropout {self.hidden_dropout} and --attention-dropout "
                             f"{self.attention_dropout} must lie in [0, 1)")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"dtype {self.dtype!r}: use --bf16, --fp16 or neither (fp32)")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"--normalization {self.normalization!r}: choose LayerNorm or RMSNorm")
        if self.position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise ValueError(f"--position-embedding-type {self.position_embedding_type!r}: "
                             "choose learned_absolute, rope or none")
        if self.transformer_impl not in ("transformer_engine", "local"):
            raise ValueError(f"--transformer-impl {self.transformer_impl!r}: "
                             "choose transformer_engine or local")
        if self.context_parallel_size > 1 and not self.uses_flash:
            raise ValueError("--context-parallel-size > 1 needs Transformer Engine's "
                             "fused attention; drop --attention-backend unfused / "
                             "--transformer-impl local")
        if (self.recompute.granularity == "full" and self.recompute.method == "uniform"
                and self.layers_per_chunk % self.recompute.num_layers):
            raise ValueError(f"--recompute-num-layers {self.recompute.num_layers} must divide "
                             f"the layers per model chunk ({self.layers_per_chunk}) with "
                             "--recompute-method uniform")

    # ---- derived sizes ------------------------------------------------------------------

    @property
    def ffn(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:
            return int((4 * self.hidden_size * 2 / 3) / 64) * 64
        return 4 * self.hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def vocab(self) -> int:
        """Padded vocabulary as Megatron-LM pads it (multiple of divisible_by x TP)."""
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        multiple = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    @property
    def act_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def uses_flash(self) -> bool:
        return self.flash_attention and self.transformer_impl == "transformer_engine"

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def vpp(self) -> int:
        return self.virtual_stages

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def layers_per_chunk(self) -> int:
        return self.num_layers // (self.pipeline_model_parallel_size * self.virtual_stages)

    @property
    def microbatches(self) -> int:
        """Microbatches per iteration per data-parallel replica (Megatron's num_microbatches)."""
        gbs = self.global_batch_size or self.micro_batch_size * self.data_parallel_size
        return gbs // (self.micro_batch_size * self.data_parallel_size)

    @property
    def world_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size * self.data_parallel_size)

    @property
    def tokens(self) -> int:
        """T: tokens of one microbatch on one context-parallel rank."""
        return self.seq_length // self.context_parallel_size * self.micro_batch_size

    @property
    def sp_width(self) -> float:
        """h_sp: per-token width of the sequence-parallel-region tensors on one TP rank."""
        t = self.tensor_model_parallel_size
        return self.hidden_size / t if self.sequence_parallel and t > 1 else self.hidden_size

    def with_changes(self, **changes) -> "JobSpec":
        return replace(self, **changes)

    @classmethod
    def from_megatron_args(cls, args, **overrides) -> "JobSpec":
        """From Megatron-LM's parsed arguments (``megatron.training.get_args()`` or the
        planner's own parse of the same flags): attribute names are Megatron-LM's dests."""
        get = lambda name, default=None: (  # noqa: E731
            getattr(args, name, default) if getattr(args, name, None) is not None else default)
        layers, pp = get("num_layers"), get("pipeline_model_parallel_size", 1)
        vpp = (get("num_virtual_stages_per_pipeline_rank")
               or get("virtual_pipeline_model_parallel_size"))
        per_stage = get("num_layers_per_virtual_pipeline_stage")
        if vpp is None and per_stage:
            if layers % (pp * per_stage):
                raise ValueError(f"--num-layers {layers} must divide by "
                                 "--pipeline-model-parallel-size x "
                                 f"--num-layers-per-virtual-pipeline-stage = {pp} x {per_stage}")
            vpp = layers // (pp * per_stage)
        dtype = "bf16" if get("bf16", False) else "fp16" if get("fp16", False) else "fp32"
        granularity = get("recompute_granularity") or (
            "selective" if get("recompute_activations", False) else "none")
        modules = get("recompute_modules") or ["core_attn"]
        recompute = Recompute(granularity=granularity, modules=tuple(modules),
                              method=get("recompute_method") or "uniform",
                              num_layers=get("recompute_num_layers") or 1)
        impl = get("transformer_impl", "transformer_engine")
        backend = str(get("attention_backend", "auto")).split(".")[-1].lower()
        # Megatron-LM uses --num-query-groups only with --group-query-attention.
        groups = get("num_query_groups") if get("group_query_attention", False) else None
        swiglu = bool(get("swiglu", False))
        fields_ = dict(
            num_layers=layers, hidden_size=get("hidden_size"),
            num_attention_heads=get("num_attention_heads"), seq_length=get("seq_length"),
            ffn_hidden_size=get("ffn_hidden_size"), num_query_groups=groups,
            kv_channels=get("kv_channels"), micro_batch_size=get("micro_batch_size", 1),
            global_batch_size=get("global_batch_size"),
            vocab_size=get("vocab_size", 50257), padded_vocab_size=get("padded_vocab_size"),
            make_vocab_size_divisible_by=get("make_vocab_size_divisible_by", 128),
            max_position_embeddings=get("max_position_embeddings"),
            tensor_model_parallel_size=get("tensor_model_parallel_size", 1),
            pipeline_model_parallel_size=pp, virtual_stages=vpp or 1,
            context_parallel_size=get("context_parallel_size", 1),
            data_parallel_size=get("data_parallel_size", 1),
            sequence_parallel=bool(get("sequence_parallel", False)),
            swiglu=swiglu, normalization=get("normalization", "LayerNorm"),
            add_bias_linear=bool(get("add_bias_linear", True)),
            position_embedding_type=get("position_embedding_type", "learned_absolute"),
            untie_embeddings_and_output_weights=bool(
                get("untie_embeddings_and_output_weights", False)),
            hidden_dropout=float(get("hidden_dropout", 0.1)),
            attention_dropout=float(get("attention_dropout", 0.1)),
            attention_softmax_in_fp32=bool(get("attention_softmax_in_fp32", False)), dtype=dtype,
            transformer_impl=impl,
            flash_attention=impl == "transformer_engine" and backend not in ("unfused", "local"),
            bias_activation_fusion=bool(
                get("bias_swiglu_fusion" if swiglu else "bias_gelu_fusion", True)),
            rope_fusion=bool(get("apply_rope_fusion", True)),
            masked_softmax_fusion=bool(get("masked_softmax_fusion", True)), recompute=recompute,
            distribute_saved_activations=bool(get("distribute_saved_activations", False)),
            use_distributed_optimizer=bool(get("use_distributed_optimizer", False)),
            accumulate_allreduce_grads_in_fp32=get("accumulate_allreduce_grads_in_fp32"),
            optimizer=get("optimizer", "adam"),
            microbatch_group_size_per_vp_stage=get("microbatch_group_size_per_vp_stage"),
        )
        fields_.update(overrides)
        return cls(**fields_)
