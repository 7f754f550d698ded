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
    """Step size of the plain SGD step the reference runner applies on main_grad."""

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

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def label(self) -> str:
        s = f"pp{self.pp}" + (f"vpp{self.vpp}" if self.vpp else "") + f"-m{self.microbatches}"
        if self.recompute:
            s += f"-rc{self.recompute}"
        if self.tie_embeddings:
            s += "-tied"
        return s


# --- config and model -----------------------------------------------------------------------

def transformer_config(case: TinyGPTCase):
    from megatron.core.transformer.transformer_config import TransformerConfig

    recompute = {}
    if case.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1)
    elif case.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=case.num_layers,
        hidden_size=case.hidden_size,
        num_attention_heads=case.num_attention_heads,
        ffn_hidden_size=case.ffn_hidden_size or 4 * case.hidden_size,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=case.pp,
        virtual_pipeline_model_parallel_size=case.vpp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # fusions go through torch.compile / CUDA kernels: off on CPU
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        overlap_p2p_comm=case.p2p_overlap,
        batch_p2p_comm=case.p2p_batch,
        deallocate_pipeline_outputs=case.deallocate_pipeline_outputs,
        **recompute,
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


def build_model(case: TinyGPTCase) -> list:
    """This rank's model chunks, wrapped in megatron-core's DistributedDataParallel.

    Requires parallel state initialized for ``case`` (``reference.init_parallel_state``).
    Sets on the shared TransformerConfig, as Megatron-LM's training does:
    ``no_sync_func`` (one per chunk), ``finalize_model_grads_func``; no overlapped grad
    reduce or param gather, so ``grad_sync_func`` / ``param_sync_func`` stay None.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(case)
    spec = get_gpt_layer_local_spec()
    chunks = []
    for vp_stage in range(case.num_chunks):
        vp = vp_stage if case.vpp is not None else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=case.vocab_size,
            max_sequence_length=case.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=case.tie_embeddings,
            position_embedding_type="learned_absolute",
            vp_stage=vp,
        )
        init_weights(model, case)
        chunks.append(model)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=False, overlap_grad_reduce=False, use_distributed_optimizer=False,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    no_sync = [m.no_sync for m in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.grad_sync_func = None
    config.param_sync_func = None
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
    training run shows its loss falling, unlike uniform random tokens.
    """
    key = f"data/{iteration}/{dp_rank}/{microbatch}"
    gen = torch.Generator().manual_seed(_name_seed(case.seed, key))
    rows = case.micro_batch_size
    start = torch.randint(0, case.vocab_size, (rows, 1), generator=gen)
    stride = torch.randint(1, 4, (rows, 1), generator=gen)
    seq = (start + stride * torch.arange(case.seq_length + 1)) % case.vocab_size
    return {
        "tokens": seq[:, :-1].contiguous(),
        "labels": seq[:, 1:].contiguous(),
        "position_ids": torch.arange(case.seq_length).unsqueeze(0).expand(
            case.micro_batch_size, -1).contiguous(),
        "attention_mask": causal_mask(case.seq_length),
    }


__all__ = [
    "TinyGPTCase", "transformer_config", "build_model", "init_weights", "global_param_names",
    "global_layer_map", "synthetic_batch", "causal_mask", "unwrap",
]
