"""Bytes and FLOPs of a Megatron GPT / Llama-style job, and the offload ratio k. Pure arithmetic.

Everything here is a function of the job's Megatron-LM flags
(:class:`~megatron_offload.planning.job.JobSpec`); nothing imports torch. Three things are
modelled:

1. **Saved activations** per transformer layer and microbatch on one rank: every tensor autograd
   keeps for the backward, term by term (:func:`layer_terms`), following what megatron-core
   0.16 saves (read from its code, and for the local spec measured on CPU through saved-tensor
   hooks, unique storages, as the runtime counts them). A *unit* (one model chunk for one
   microbatch, the schedule's unit) is the layers of the chunk plus the per-unit terms (causal
   mask) and, on the first and last pipeline stage, the embedding and loss terms
   (:func:`unit_terms`).
2. **Static memory** per rank: parameters, gradient buffer and optimizer state
   (:func:`static_bytes`), plus a documented estimate of the working memory of a backward
   (:func:`working_bytes`).
3. **Time**: FLOPs per layer (:func:`layer_flops`; backward = 2 x forward, plus the recomputed
   forward) and k = (D2H + H2D time of a unit's offloadable bytes) / (F + B time of the unit)
   (:func:`offload_ratio`).

Notation in the docstrings: s = sequence length, b = micro batch, h = hidden size, a = heads,
g = query groups, f = FFN hidden size, t = tensor-parallel size, c = context-parallel size,
d = bytes per activation element (2 for bf16/fp16, 4 for fp32), T = (s / c) b tokens on a rank,
h_sp = h / t with sequence parallelism, h without (the width of the tensors in the sequence-
parallel region: layer input, norm in/out, residual, dropout masks after a row-parallel linear).

The PipeOffload paper's check of k (Wan et al., ICML 2025, section 2) is :func:`paper_k`;
``python -m megatron_offload.planning.costmodel`` prints it with its assumptions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_offload.planning.job import NO_RECOMPUTE, JobSpec, Recompute

GiB = 2**30

DEFAULT_MIN_OFFLOAD_BYTES = 64 * 1024
"""The runtime's ``--offload-min-bytes`` default: smaller saved tensors stay on the device."""


# ---- activation terms -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Term:
    """``count`` saved tensors of ``tensor_bytes`` bytes each (one layer, unit or stage)."""

    name: str
    tensor_bytes: float
    count: int = 1
    doc: str = field(default="", compare=False)
    moves: bool = True
    """False for what the runtime keeps on the device whatever its size, because something
    besides the unit's saved tensors references it when the forward returns (its
    reference-count rule, ``runtime/store.py``): shared caches, checkpoint inputs megatron-core
    holds twice."""

    @property
    def bytes(self) -> float:
        return self.tensor_bytes * self.count

    def scaled(self, factor: float) -> "Term":
        return Term(self.name, self.tensor_bytes, self.count * factor, self.doc, self.moves)


def _norm_terms(job: JobSpec, which: str, recompute: Recompute) -> list[Term]:
    """One norm (``which`` = norm1 / norm2 / final_norm): its input, its output (saved by the
    following linear, the local shard with sequence parallelism) and its statistics.

    - Transformer Engine (fused norm, LayerNorm-Linear): input, output, fp32 mean + rstd per
      token (LayerNorm) or rstd (RMSNorm).
    - local spec, LayerNorm (``torch.nn.LayerNorm``): the same; statistics are fp32 on CUDA,
      d bytes on CPU (measured).
    - local spec, RMSNorm (``torch.nn.RMSNorm``, composite): the input upcast to fp32 (4 bytes;
      the d-byte input is not kept), the fp32 rsqrt per token, the fp32 normalized tensor and
      the d-byte output (measured on CPU, fp32 and bf16).
    - ``--recompute-modules layernorm`` (norm1 and norm2 only): Megatron's CheckpointWithoutOutput
      keeps the input (d bytes, also for local RMSNorm: its fp32 upcast is recomputed) and
      releases the output after the linear used it: input only.
    """
    T, hs, d = job.tokens, job.sp_width, job.act_bytes
    stat = 4 if job.device == "cuda" else d
    local_rms = job.transformer_impl == "local" and job.normalization == "RMSNorm"
    if which != "final_norm" and recompute.has("layernorm"):
        # The checkpoint keeps the norm's d-byte input itself (the fp32 upcast of local
        # RMSNorm happens inside the recomputed forward).
        # Measured: the runtime finds these inputs referenced besides the saved tensors and
        # keeps them (except the unit's received input, which it always moves: unit_terms).
        return [Term(f"{which}_input", T * hs * d, doc="norm input kept by the checkpoint",
                     moves=False)]
    in_bytes = 4 if local_rms else d
    terms = [Term(f"{which}_input", T * hs * in_bytes, doc="norm input (layer input / residual)")]
    terms.append(Term(f"{which}_output", T * hs * d, doc="norm output, saved by the next linear"))
    if job.normalization == "LayerNorm":
        terms.append(Term(f"{which}_stats", T * stat, 2, doc="mean and rstd per token"))
    elif local_rms:
        terms.append(Term(f"{which}_stats", T * 4, doc="rsqrt per token (fp32)"))
        terms.append(Term(f"{which}_normalized", T * hs * 4,
                          doc="x * rsqrt in fp32 (local RMSNorm)"))
    else:
        terms.append(Term(f"{which}_stats", T * 4, doc="rstd per token (fp32)"))
    return terms


def _attention_terms(job: JobSpec, recompute: Recompute) -> list[Term]:
    """Self-attention from the QKV linear's output to the output projection's input.

    QKV storages (what the saved q, k, v reference; a saved view keeps its whole storage):
    - flash / fused attention (TE): q, k, v as the kernel keeps them, (a + 2g) x head_dim / t
      elements per token, plus the fp32 softmax statistics (a / t per token).
    - unfused (megatron-core DotProductAttention): with GQA (g < a) k and v are expanded to a
      heads by repeat_interleave and q is copied by a reshape: 3 a head_dim / t; with a = g
      q, k, v are views of the QKV output, 3 a head_dim / t, and RoPE adds rotated copies of
      q and k (5 a head_dim / t in all: v still keeps the whole QKV output alive);
      the softmax output per (b, head, query, key) in d bytes (fp32 with
      ``--attention-softmax-in-fp32`` and unfused softmax, when the d-byte probabilities are
      kept as well); attention dropout adds its mask (1 byte on CUDA, d on CPU) and output.
    - ``--recompute-modules core_attn``: megatron checkpoints core attention, keeping its inputs
      q, k, v (storages: the QKV output, plus rotated q, k with RoPE) and nothing inside.
    - unfused RoPE (``--no-rope-fusion``) keeps 4 cos/sin tables (s/c x head_dim, d bytes).
    The output (context) is saved by the output projection: a head_dim / t per token.
    """
    T, d, t = job.tokens, job.act_bytes, job.tp
    hd, a, g = job.head_dim, job.num_attention_heads, job.query_groups
    qd, kvd = a * hd / t, g * hd / t
    rope = job.position_embedding_type == "rope"
    s_local, s_keys, b = (job.seq_length // job.context_parallel_size, job.seq_length,
                          job.micro_batch_size)
    terms: list[Term] = []
    if rope and not job.rope_fusion:
        terms.append(Term("rope_cos_sin", s_local * hd * d, 4,
                          doc="unfused RoPE: cos and sin for q and k"))
    mixed = Term("qkv_output", T * (qd + 2 * kvd) * d,
                 doc="QKV linear output (q, k, v are views of it)")
    if recompute.has("core_attn"):
        terms.append(Term("attn_mask_type", 4, doc="the checkpoint's int32 mask-type tensor"))
        terms.append(mixed)
        if rope:
            terms.append(Term("q_rotated", T * qd * d, doc="RoPE output, checkpoint input"))
            terms.append(Term("k_rotated", T * kvd * d, doc="RoPE output, checkpoint input"))
    elif job.uses_flash:
        terms.append(Term("q", T * qd * d, doc="query as the fused kernel keeps it"))
        terms.append(Term("k", T * kvd * d, doc="key"))
        terms.append(Term("v", T * kvd * d, doc="value"))
        terms.append(Term("softmax_lse", T * (a / t) * 4,
                          doc="fp32 log-sum-exp per head and token"))
    else:
        if g < a:
            terms.append(Term("q_k_v_expanded", T * qd * d, 3,
                              doc="q (reshaped copy) and k, v expanded to all heads"))
        else:
            terms.append(mixed)
            if rope:
                terms.append(Term("q_k_rotated", T * qd * d, 2, doc="RoPE outputs q, k"))
        scores = b * (a / t) * s_local * s_keys
        sm_fp32 = job.attention_softmax_in_fp32 and not (
            job.masked_softmax_fusion and job.device == "cuda" and job.dtype != "fp32")
        mask_bytes = 1 if job.device == "cuda" else d
        if sm_fp32 and d != 4:
            terms.append(Term("softmax_fp32", scores * 4, doc="softmax output in fp32"))
        else:
            terms.append(Term("softmax", scores * d, doc="softmax output"))
        if job.attention_dropout > 0:
            terms.append(Term("attention_dropout_mask", scores * mask_bytes,
                              doc="attention dropout mask"))
            terms.append(Term("attention_probs", scores * d,
                              doc="dropout output, saved by the context matmul"))
        elif sm_fp32 and d != 4:
            terms.append(Term("attention_probs", scores * d,
                              doc="probabilities cast to d bytes for the context matmul"))
    terms.append(Term("context", T * qd * d,
                      doc="attention output, saved by the output projection"))
    return terms


def _mlp_terms(job: JobSpec) -> list[Term]:
    """MLP between the fc1 input (the norm2 output, counted there) and the fc2 input.

    - fused bias-activation (Megatron's bias_gelu / bias_swiglu): fc1 output (f or 2f per
      token over t) and the activation output (f / t).
    - unfused GeLU: fc1 output (+ bias) and GeLU output: 2 f / t.
    - unfused SwiGLU (megatron-core ``glu``): fc1 output 2 f / t, ``x_linear + offset``, SiLU
      output and the product: 5 f / t (measured).
    """
    T, d, f = job.tokens, job.act_bytes, job.ffn / job.tp
    if job.bias_activation_fusion and job.device == "cuda":
        if job.swiglu:
            return [Term("fc1_output", T * 2 * f * d, doc="fc1 output (gate and linear halves)"),
                    Term("activation_output", T * f * d, doc="SwiGLU output, saved by fc2")]
        return [Term("fc1_output", T * f * d, doc="fc1 output"),
                Term("activation_output", T * f * d, doc="GeLU output, saved by fc2")]
    if job.swiglu:
        return [Term("fc1_output", T * 2 * f * d, doc="fc1 output (gate and linear halves)"),
                Term("glu_parts", T * f * d, 3,
                     doc="x_linear + offset, SiLU output, product (saved by fc2)")]
    return [Term("fc1_output", T * f * d, doc="fc1 output (+ bias)"),
            Term("activation_output", T * f * d, doc="GeLU output, saved by fc2")]


def _dropout_mask(job: JobSpec, name: str) -> list[Term]:
    if job.hidden_dropout <= 0:
        return []
    mask_bytes = 1 if job.device == "cuda" else job.act_bytes
    return [Term(name, job.tokens * job.sp_width * mask_bytes,
                 doc="hidden dropout mask (after a row-parallel linear)")]


def layer_terms(job: JobSpec, recompute: Recompute | None = None) -> list[Term]:
    """Saved tensors of one transformer layer for one microbatch on one rank, without full
    recompute (full recompute is a per-chunk matter: :func:`unit_terms`).

    In the order of the forward: norm1, attention, the dropout mask of the attention's
    bias-dropout-add, norm2 (its input is the residual), MLP (nothing with
    ``--recompute-modules mlp``: the checkpoint keeps only the norm2 output), the MLP's dropout
    mask. The layer's output is the next layer's norm1 input.
    """
    recompute = job.recompute if recompute is None else recompute
    if recompute.granularity == "full":
        recompute = NO_RECOMPUTE
    terms = (_norm_terms(job, "norm1", recompute) + _attention_terms(job, recompute)
             + _dropout_mask(job, "attention_bda_mask"))
    terms += _norm_terms(job, "norm2", recompute)
    if not recompute.has("mlp"):
        terms += _mlp_terms(job)
    terms += _dropout_mask(job, "mlp_bda_mask")
    return terms


def first_stage_terms(job: JobSpec) -> list[Term]:
    """Embedding (first pipeline stage, model chunk 0): the token ids the lookup keeps (int64;
    with micro batch 1 the storage of s + 1 ids Megatron-LM's batch slices them from),
    the position ids with learned positions, the embedding dropout mask. The embedding output
    is layer 1's norm1 input (counted there)."""
    T = job.tokens
    # Megatron-LM's get_batch takes tokens[:, :-1].contiguous() of s + 1 tokens: with one row
    # that is already contiguous, a view of the whole s + 1 storage (measured).
    ids = T + 1 if job.micro_batch_size == 1 and job.context_parallel_size == 1 else T
    terms = [Term("input_ids", ids * 8, doc="token ids kept by the embedding lookup")]
    if job.tp > 1:
        terms.append(Term("vocab_mask", T * 1, doc="vocab-parallel embedding: out-of-shard mask"))
    if job.position_embedding_type == "learned_absolute":
        terms.append(Term("position_ids", T * 8, doc="position ids kept by the position embedding"))
    return terms + _dropout_mask(job, "embedding_dropout_mask")


def last_stage_terms(job: JobSpec) -> list[Term]:
    """Output and loss (last pipeline stage, last model chunk): the final norm, the fp32
    softmax Megatron's vocab-parallel cross entropy keeps (it casts the logits to fp32; the
    d-byte logits are not kept), and its target mask (bool) and masked targets (int64)."""
    T = job.tokens
    return _norm_terms(job, "final_norm", NO_RECOMPUTE) + [
        Term("logits_fp32", T * job.vocab / job.tp * 4, doc="fp32 softmax of the cross entropy"),
        Term("loss_targets", T * 9, doc="target mask (bool) and masked targets (int64)"),
    ]


def unit_shared_terms(job: JobSpec, recompute: Recompute | None = None) -> list[Term]:
    """Kept once per unit, whatever the layers: the causal mask ([1, 1, s, s] bool) that unfused
    attention (and a full-recompute checkpoint) keeps; under full recompute with RoPE, the fp32
    rotary frequency table ([s/c, 1, 1, head_dim]) each checkpoint keeps as an input."""
    recompute = job.recompute if recompute is None else recompute
    terms = []
    if not job.uses_flash:
        terms.append(Term("attention_mask", job.seq_length * job.seq_length * 1,
                          doc="causal mask (bool), shared by the chunk's layers"))
    if recompute.granularity == "full" and job.position_embedding_type == "rope":
        terms.append(Term("rotary_freqs",
                          job.seq_length // job.context_parallel_size * job.head_dim * 4,
                          doc="RoPE table kept by the checkpoints",
                          moves=False))  # a cache shared by the units: stays
    return terms


def received_input_terms(job: JobSpec, rank: int, chunk: int,
                         recompute: Recompute | None = None) -> list[Term]:
    """The hidden state a unit receives from the previous stage (every unit but the first
    stage's chunk 0). The runtime counts it as the unit's memory (the schedule holds it until
    the backward). Usually it is the first layer's norm input (or a full-recompute checkpoint's
    input), already a term; not with the local spec's RMSNorm in 16 bits, which keeps an fp32
    upcast of its input instead, so the d-byte tensor received is one more storage (measured)."""
    recompute = job.recompute if recompute is None else recompute
    if rank == 0 and chunk == 0:
        return []
    upcast = (job.transformer_impl == "local" and job.normalization == "RMSNorm"
              and job.act_bytes != 4)
    if upcast and recompute.granularity != "full" and not recompute.has("layernorm"):
        return [Term("received_input", job.tokens * job.sp_width * job.act_bytes,
                     doc="hidden state received from the previous stage (the norm "
                         "keeps an fp32 copy)")]
    return []


def unit_terms(job: JobSpec, rank: int, chunk: int,
               recompute: Recompute | None = None) -> list[Term]:
    """Everything one unit (model chunk ``chunk`` of pipeline rank ``rank``, one microbatch)
    keeps: its layers (full recompute: the checkpoint inputs plus the layers that are not
    recomputed), the per-unit terms (causal mask, received input where it is an extra storage)
    and the first / last stage terms. What the runtime measures as the unit's bytes
    (``IterationStats.unit_bytes``: its saved storages plus its received input, not its output)."""
    recompute = job.recompute if recompute is None else recompute
    n = job.layers_per_chunk
    if recompute.granularity == "full":
        if recompute.method == "uniform":
            checkpoints, plain = math.ceil(n / recompute.num_layers), 0
        else:
            checkpoints, plain = min(recompute.num_layers, n), n - min(recompute.num_layers, n)
        width = (job.hidden_size / job.tp
                 if job.distribute_saved_activations and not job.sequence_parallel
                 else job.sp_width)
        terms = [Term("checkpoint_input", job.tokens * width * job.act_bytes, checkpoints,
                      doc="input of each recomputed group")]
        terms += [term.scaled(plain) for term in layer_terms(job, NO_RECOMPUTE)] if plain else []
    else:
        terms = [term.scaled(n) for term in layer_terms(job, recompute)]
    if (recompute.granularity != "full" and recompute.has("layernorm")
            and not (rank == 0 and chunk == 0)):
        # The first layer's norm1 input is the received input: the runtime moves it.
        terms = [term.scaled((n - 1) / n) if term.name == "norm1_input" else term for term in terms]
        terms.append(Term("received_input", job.tokens * job.sp_width * job.act_bytes,
                          doc="received input (first layer's norm1 input), always moved"))
    terms += unit_shared_terms(job, recompute)
    terms += received_input_terms(job, rank, chunk, recompute)
    if rank == 0 and chunk == 0:
        terms += first_stage_terms(job)
    if rank == job.pp - 1 and chunk == job.vpp - 1:
        terms += last_stage_terms(job)
    return terms


@dataclass(frozen=True, slots=True)
class UnitBytes:
    """Bytes of one unit, split by what the runtime moves."""

    total: int
    offloadable: int
    """Saved tensors of at least ``min_offload_bytes``: what offload moves to the host."""

    @property
    def kept(self) -> int:
        """Small tensors that stay on the device even when the unit is offloaded."""
        return self.total - self.offloadable


def split_bytes(terms: list[Term], min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES) -> UnitBytes:
    total = sum(term.bytes for term in terms)
    movable = sum(term.bytes for term in terms
                  if term.moves and term.tensor_bytes >= min_offload_bytes)
    return UnitBytes(total=int(round(total)), offloadable=int(round(movable)))


def unit_bytes(job: JobSpec, rank: int, chunk: int, recompute: Recompute | None = None,
               min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES) -> UnitBytes:
    return split_bytes(unit_terms(job, rank, chunk, recompute), min_offload_bytes)


def layer_bytes(job: JobSpec, recompute: Recompute | None = None) -> int:
    """Saved bytes of one layer for one microbatch (no full recompute; see :func:`unit_terms`)."""
    return int(round(sum(term.bytes for term in layer_terms(job, recompute))))


def overhead_bytes(job: JobSpec, rank: int) -> float:
    """Resident activation bytes the runtime measures on a rank beyond its units' own: up to
    two received hidden states (T x h_sp x d each) whose unit's backward already ran but which
    megatron-core's schedule still references until its next exchange (measured on CPU, 1F1B
    and interleaved; not on the first stage without interleaving, which receives nothing)."""
    if rank == 0 and job.vpp == 1:
        return 0.0
    return 2.0 * job.tokens * job.sp_width * job.act_bytes


# ---- parameters, gradients, optimizer -----------------------------------------------------------

def layer_params(job: JobSpec) -> int:
    """Parameters of one transformer layer (whole, before tensor parallelism)."""
    h, f, hd = job.hidden_size, job.ffn, job.head_dim
    qkv_out = (job.num_attention_heads + 2 * job.query_groups) * hd
    bias = job.add_bias_linear
    params = h * qkv_out + (qkv_out if bias else 0)
    params += job.num_attention_heads * hd * h + (h if bias else 0)
    fc1_out = 2 * f if job.swiglu else f
    params += h * fc1_out + (fc1_out if bias else 0) + f * h + (h if bias else 0)
    params += 2 * (2 * h if job.normalization == "LayerNorm" else h)
    return params


def rank_params(job: JobSpec, rank: int) -> int:
    """Parameters held by one (pipeline ``rank``, any TP rank): its layers (linear weights split
    over t, norms replicated), the embedding (first stage), final norm and output layer (last
    stage; with tied embeddings and p > 1 the last stage holds its own copy)."""
    t, h = job.tp, job.hidden_size
    norms = 2 * (2 * h if job.normalization == "LayerNorm" else h)
    per_layer = (layer_params(job) - norms) / t + norms
    params = per_layer * job.layers_per_chunk * job.vpp
    if rank == 0:
        params += job.vocab * h / t
        if job.position_embedding_type == "learned_absolute":
            params += (job.max_position_embeddings or job.seq_length) * h
    if rank == job.pp - 1:
        params += 2 * h if job.normalization == "LayerNorm" else h
        if job.untie_embeddings_and_output_weights or job.pp > 1:
            params += job.vocab * h / t
    return int(params)


def total_params(job: JobSpec) -> int:
    h = job.hidden_size
    params = (layer_params(job) * job.num_layers + job.vocab * h
              + (2 * h if job.normalization == "LayerNorm" else h))
    if job.position_embedding_type == "learned_absolute":
        params += (job.max_position_embeddings or job.seq_length) * h
    if job.untie_embeddings_and_output_weights:
        params += job.vocab * h
    return params


@dataclass(frozen=True, slots=True)
class StaticBytes:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def static_bytes(job: JobSpec, rank: int) -> StaticBytes:
    """Parameters + gradient buffer + optimizer state on one rank of pipeline stage ``rank``.

    - parameters: d bytes each (``--bf16`` / ``--fp16``: 2; fp32: 4);
    - Megatron DDP's gradient buffer: fp32 with ``--accumulate-allreduce-grads-in-fp32``
      (Megatron-LM switches it on for bf16), else the parameter dtype;
    - Adam: fp32 main parameters (only for 16-bit parameters) + two fp32 moments = 12 (8 for
      fp32 training) bytes per parameter; SGD: main parameters + momentum. The distributed
      optimizer (``--use-distributed-optimizer``) shards this over the data-parallel (x context-
      parallel) ranks. The classic totals: 18 bytes per parameter, 6 + 12 / dp distributed.
    """
    params = rank_params(job, rank)
    pbytes = job.act_bytes
    fp32_grads = job.accumulate_allreduce_grads_in_fp32
    if fp32_grads is None:
        fp32_grads = job.dtype == "bf16"
    gbytes = 4 if fp32_grads or job.dtype == "fp32" else 2
    main = 4 if job.dtype != "fp32" else 0
    state = main + (8 if job.optimizer == "adam" else 4)
    shards = (job.data_parallel_size * job.context_parallel_size
              if job.use_distributed_optimizer else 1)
    return StaticBytes(params=int(params * pbytes), grads=int(params * gbytes),
                       optimizer=int(params * state / shards))


def working_bytes(job: JobSpec, rank: int, recompute: Recompute | None = None) -> int:
    """Transient memory above the saved activations and the static state (an estimate).

    - two p2p buffers (a tensor received for the next forward, a gradient for the next backward),
      T x h_sp x d each;
    - the backward's working set: the activation gradients and, under recomputation, the
      recomputed activations of one layer (full recompute: one checkpointed group of N layers),
      taken as one layer's saved bytes without recomputation;
    - last stage: the d-byte logits alive next to the fp32 copy during the forward and the d-byte
      logit gradient in the backward: T x V / t x d.
    Allocator fragmentation and the CUDA context are left to the reserve of the budget.
    """
    recompute = job.recompute if recompute is None else recompute
    p2p = 2 * job.tokens * job.sp_width * job.act_bytes
    layers = (recompute.num_layers
              if recompute.granularity == "full" and recompute.method == "uniform" else 1)
    work = layers * layer_bytes(job, NO_RECOMPUTE)
    logits = job.tokens * job.vocab / job.tp * job.act_bytes if rank == job.pp - 1 else 0
    return int(p2p + work + logits)


# ---- FLOPs and time -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LayerFlops:
    """FLOPs of one transformer layer for one microbatch on one (TP, CP) rank."""

    forward: float
    backward: float
    """2 x forward, plus the recomputed forward."""
    recompute: float
    """The part of ``backward`` spent recomputing."""


def layer_flops(job: JobSpec, recompute: Recompute | None = None) -> LayerFlops:
    """Matmul FLOPs (2 per multiply-add) per layer: QKV 2 h (a + 2g) hd, output projection
    2 a hd h, attention scores and context 2 x 2 s a hd (all key positions, no causal saving,
    as the paper and Megatron's own throughput report count), MLP 2 h f x (3 with SwiGLU, else
    2), per token; T tokens; split over t. For a = g, hd = h / a, f = 4h, GeLU this is
    4 h (6 h + s) per token, the paper's count. Backward = 2 x forward; recomputation adds the
    recomputed forward (full: all of it; core_attn: the attention core; mlp: the MLP; layernorm:
    nothing worth counting)."""
    recompute = job.recompute if recompute is None else recompute
    h, f, hd, a, g = (job.hidden_size, job.ffn, job.head_dim, job.num_attention_heads,
                      job.query_groups)
    s = job.seq_length
    linear_attn = 2 * h * (a + 2 * g) * hd + 2 * a * hd * h
    core = 4 * s * a * hd
    mlp = 2 * h * f * (3 if job.swiglu else 2)
    scale = job.tokens / job.tp
    forward = (linear_attn + core + mlp) * scale
    if recompute.granularity == "full":
        if recompute.method == "block":
            again = forward * min(recompute.num_layers, job.layers_per_chunk) / job.layers_per_chunk
        else:
            again = forward
    else:
        again = ((core * scale if recompute.has("core_attn") else 0.0)
                 + (mlp * scale if recompute.has("mlp") else 0.0))
    return LayerFlops(forward=forward, backward=2 * forward + again, recompute=again)


def unit_times(job: JobSpec, tflops: float,
               recompute: Recompute | None = None) -> tuple[float, float]:
    """(forward, backward) seconds of one unit (``layers_per_chunk`` layers) at ``tflops``
    achieved TFLOP/s. The embedding and the output layer are not included (see
    :mod:`megatron_offload.planning.search`, "Not modelled")."""
    flops = layer_flops(job, recompute)
    rate = tflops * 1e12
    n = job.layers_per_chunk
    return n * flops.forward / rate, n * flops.backward / rate


def offload_ratio(nbytes: float, compute_s: float, d2h_gbps: float,
                  h2d_gbps: float | None = None) -> float:
    """k = (D2H + H2D time of ``nbytes``) / ``compute_s`` (forward + backward time of the same
    unit); link speeds in GB/s (1e9 bytes/s) per direction."""
    h2d_gbps = d2h_gbps if h2d_gbps is None else h2d_gbps
    if compute_s <= 0:
        raise ValueError(f"compute time {compute_s} must be > 0")
    return (nbytes / (d2h_gbps * 1e9) + nbytes / (h2d_gbps * 1e9)) / compute_s


# ---- the paper's k -------------------------------------------------------------------------------

PAPER_TFLOPS = 220.0
"""A100 achieved compute rate B_c of the paper (TFLOP/s)."""
PAPER_GBPS = 15.0
"""A100 host-link bandwidth B_o of the paper (GB/s per direction, all GPUs copying)."""
PAPER_VALUES = {
    4096: {4096: 1.71, 8192: 1.49, 16384: 1.19, 32768: 0.85},
    8192: {4096: 0.92, 8192: 0.85, 16384: 0.75, 32768: 0.60},
}
"""The paper's worked k values: hidden -> sequence -> k (the PipeOffload paper, section 2)."""

PAPER_ASSUMPTIONS = (
    "paper assumptions: offloaded bytes per layer = 20 s b h (bf16, flash attention, LayerNorm, "
    "GeLU and dropout recomputed: norm inputs 2+2, q/k/v 6, attention output 2, fc1 output 8); "
    "forward FLOPs per token per layer = 4 h (6 h + s) (a = g, f = 4h, GeLU); backward = 2 x "
    "forward; D2H and H2D each at B_o, one after the other; B_c = {tflops:g} TFLOP/s, "
    "B_o = {gbps:g} GB/s; k = 10 / (3 (6h + s)) x B_c / B_o"
)


def paper_job(hidden: int, seq: int, micro_batch: int = 1) -> JobSpec:
    """A layer as the paper assumes it: bf16, flash attention, a = g, f = 4h, GeLU, no dropout
    (the paper recomputes it from the RNG state), LayerNorm recomputed."""
    return JobSpec(num_layers=1, hidden_size=hidden, num_attention_heads=hidden // 128,
                   seq_length=seq, micro_batch_size=micro_batch, dtype="bf16",
                   hidden_dropout=0.0, attention_dropout=0.0,
                   recompute=Recompute(granularity="selective", modules=("layernorm",)))


def paper_offload_bytes(job: JobSpec) -> int:
    """The paper's offloaded bytes per layer from our term list: the layer with LayerNorm
    recomputed, minus what the paper also recomputes (the activation output, kept by fc2) and
    the fp32 softmax statistics it neglects. Equals 20 s b h for :func:`paper_job`."""
    return int(sum(t.bytes for t in layer_terms(job)
                   if t.name not in ("activation_output", "softmax_lse")))


def paper_k(hidden: int, seq: int, tflops: float = PAPER_TFLOPS, gbps: float = PAPER_GBPS) -> float:
    """k from our cost model under the paper's assumptions (bytes from :func:`paper_offload_bytes`,
    FLOPs from :func:`layer_flops`)."""
    job = paper_job(hidden, seq)
    forward, backward = unit_times(job, tflops, NO_RECOMPUTE)
    return offload_ratio(paper_offload_bytes(job), forward + backward, gbps)


def paper_k_formula(hidden: int, seq: int, tflops: float = PAPER_TFLOPS,
                    gbps: float = PAPER_GBPS) -> float:
    """The paper's closed form, 10 / (3 (6h + s)) x B_c / B_o."""
    return 10.0 / (3.0 * (6 * hidden + seq)) * (tflops * 1e12) / (gbps * 1e9)


def paper_k_table(tflops: float = PAPER_TFLOPS, gbps: float = PAPER_GBPS) -> str:
    lines = [PAPER_ASSUMPTIONS.format(tflops=tflops, gbps=gbps),
             f"{'h':>6}{'s':>7}{'k (ours)':>10}{'k (formula)':>13}{'paper':>7}{'diff':>8}"]
    for hidden, row in PAPER_VALUES.items():
        for seq, published in row.items():
            ours = paper_k(hidden, seq, tflops, gbps)
            lines.append(f"{hidden:>6}{seq:>7}{ours:>10.3f}"
                         f"{paper_k_formula(hidden, seq, tflops, gbps):>13.3f}{published:>7.2f}"
                         f"{ours / published - 1:>+8.1%}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(paper_k_table())
