"""The realistic matrix's GPU-only rows, in one process on one device, with and without offload.

A lent GPU is one device, and NCCL refuses two pipeline ranks on one device, so each row runs
pipeline rank 0's real op order (Megatron-Core's interleaved 1F1B for PP=4, VPP=2, 8
microbatches: 11 units in flight at the peak) through that rank's two model chunks, in one
process with world size 1 (gloo on CPU, NCCL on CUDA) and megatron-core's parallel state at
TP=PP=1. The model pieces are built and driven as a Megatron-LM job builds and drives them:

- each chunk is a megatron-core ``GPTModel`` without embedding and output layer
  (``pre_process=False, post_process=False``: a middle pipeline stage; its
  ``TransformerBlock`` takes the received tensor from ``set_input_tensor``), RoPE positions,
  wrapped in megatron-core's ``DistributedDataParallel`` with ``overlap_grad_reduce=True``
  (``grad_reduce_in_fp32`` for bf16, as Megatron-LM forces); ``config.no_sync_func``,
  ``config.grad_sync_func`` and ``config.finalize_model_grads_func`` are set as Megatron-LM's
  ``training.py`` sets them, and ``gradient_accumulation_fusion=True``;
- every step goes through megatron-core's own ``schedules.forward_step`` /
  ``schedules.backward_step`` (loss / num_microbatches, ``grad_scale_func``, the pseudo-freed
  output and ``custom_backward`` of ``deallocate_pipeline_outputs``); around them the driver
  does what the interleaved schedule does on rank 0: grad sync off (``no_sync``) except right
  after a chunk's last backward, where it calls ``grad_sync_func[chunk]``; the remaining syncs
  and ``finalize_model_grads`` at the end;
- between iterations megatron-core's optimizer (``get_megatron_optimizer``, Adam; fp32 main
  params for bf16) steps, after ``zero_grad_buffer`` as Megatron-LM's ``train_step`` does.

Two copies of the model with the same initial weights run the same 3 iterations on the same
data, the first as is, the second under :class:`ActivationOffloader` (policy ``full``). A row
passes when every loss, every ``main_grad`` of every iteration and the final weights are
bitwise identical, every iteration offloaded something and reloaded exactly what it offloaded,
and (on CUDA) the peak of ``torch.cuda.max_memory_allocated`` above the start of the
iteration is lower with offload (see :func:`megatron_offload.gpu_check.check.problems`).

Rows:

``local_fp32``
    megatron-core's local spec (no Transformer Engine), fp32, RoPE unfused. Megatron's fused
    wgrad needs apex's ``fused_weight_gradient_mlp_cuda``; where that CUDA extension is missing
    a stand-in (``main_grad += grad_output^T @ input``, one fp32 GEMM) is bound for the row
    (on CPU by ``cpu.core``, which the row applies). Runs on CPU too: the CPU test
    suite runs it. It is the single-process proof that saved Parameters come
    back as themselves, so Megatron's fused wgrad flags the real Parameter and DDP's
    ``overlap_grad_reduce`` hook finds its dummy grad.
``te_bf16_rope`` (CUDA + Transformer Engine)
    ``get_gpt_layer_with_transformer_engine_spec``, bf16, ``apply_rope_fusion=True`` (TE's
    fused RoPE), TE's own fused wgrad accumulation into ``main_grad``
    (``fuse_wgrad_accumulation``), ``deterministic_mode`` with
    ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0`` (else TE's attention backward is not
    reproducible and no bitwise comparison can hold).
``te_fp8`` (CUDA + Transformer Engine + an FP8-capable GPU)
    the same with ``fp8="hybrid"``, delayed scaling.

A row that cannot run here says ``"not_run": <reason>``; that is not a pass.

Where this departs from a real rank 0: both chunks take a received hidden-state tensor (no
embedding; chunk 0's input is synthetic) and chunk 1 ends in a stand-in loss (mean of squares)
instead of sending to rank 1; the layers are Llama-style (RMSNorm, SwiGLU, no biases); bf16
parameters are created in bf16 (what ``Float16Module`` would cast them to) rather than wrapped,
since at PP=1 ``Float16Module`` would upcast chunk 0's output. The reference copy runs its 3
iterations before the offload copy (FP8 delayed scaling keeps process-wide state).
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import torch

# TE reads this when it picks an attention backend; deterministic_mode requires it. Without
# it TE may pick a backward with atomics, and no two runs would be bitwise equal.
os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")

PP, VPP, MICROBATCHES = 4, 2, 8
"""The pipeline whose rank 0 each row drives (two model chunks on this rank)."""


@dataclass(frozen=True, slots=True)
class RowSize:
    hidden: int
    heads: int
    seq: int
    micro_batch: int
    layers_per_chunk: int


SMALL = RowSize(hidden=64, heads=4, seq=32, micro_batch=2, layers_per_chunk=1)
"""CPU test suite size."""

GPU = RowSize(hidden=2048, heads=16, seq=1024, micro_batch=2, layers_per_chunk=2)
"""Lent-GPU size: 4 layers of hidden 2048 per model copy (0.27 B parameters), 2048 tokens per
microbatch; a few GB of activations per unit, so 11 units in flight show the saving."""


@dataclass(frozen=True, slots=True)
class RowSpec:
    name: str
    layer_spec: str  # "local" | "te"
    dtype: torch.dtype
    rope_fusion: bool
    fp8_recipe: str | None = None  # megatron-core Fp8Recipe value ("delayed", "tensorwise")
    granularity: str = "unit"  # "layer": layer streaming (hooks on the transformer layers)

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16


ROWS = (
    RowSpec("local_fp32", "local", torch.float32, rope_fusion=False),
    RowSpec("te_bf16_rope", "te", torch.bfloat16, rope_fusion=True),
    RowSpec("te_fp8", "te", torch.bfloat16, rope_fusion=True, fp8_recipe="delayed"),
    RowSpec("local_fp32_layers", "local", torch.float32, rope_fusion=False, granularity="layer"),
    RowSpec("te_bf16_rope_layers", "te", torch.bfloat16, rope_fusion=True, granularity="layer"),
)
ROW_NAMES = tuple(row.name for row in ROWS)


# ------------------------------------------------------------------------- can it run here
def why_not_runnable(row: RowSpec, device: torch.device) -> str | None:
    """None when ``row`` can run on ``device``, else the reason (reported as not run)."""
    try:
        import megatron.core  # noqa: F401
    except ImportError as exc:
        return f"megatron-core not importable: {exc}"
    if row.layer_spec != "te":
        return None
    if device.type != "cuda":
        return "needs CUDA (Transformer Engine layers)"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a TE built for another torch / CUDA
        return f"transformer_engine not importable: {type(exc).__name__}: {exc}"
    if row.fp8_recipe is not None:
        ok, reason = _fp8_support()
        if not ok:
            return f"FP8 not supported here: {reason}"
    return None


def _fp8_support() -> tuple[bool, str]:
    try:
        from transformer_engine.pytorch.fp8 import check_fp8_support
    except ImportError:
        try:
            from transformer_engine.pytorch.quantization import check_fp8_support
        except ImportError as exc:
            return False, f"cannot ask Transformer Engine: {exc}"
    ok, reason = check_fp8_support()
    return bool(ok), str(reason)


# ---------------------------------------------------------------------- process-wide setup
@contextlib.contextmanager
def megatron_single_process(device: torch.device, dist_backend: str | None = None):
    """World size 1 (gloo on CPU, NCCL on CUDA unless ``dist_backend`` says otherwise: gloo
    also reduces CUDA tensors), parallel state TP=PP=1, CPU shims on CPU.

    Everything it set up is torn down on exit (a process group it did not create is kept).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "gpu rows: megatron-core's parallel state is already initialized in this process; "
            "run the rows in a fresh process"
        )
    created_group = False
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("gpu rows need a world size of 1 (one process, one device)")
    else:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # A HashStore needs no port: one process, nothing to rendezvous with.
        if dist_backend is None:
            dist_backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(dist_backend, store=dist.HashStore(), rank=0, world_size=1)
        created_group = True
    shims = contextlib.nullcontext(False)
    if device.type == "cpu":
        from megatron_offload.integration.cpu.core import cpu_shims

        shims = cpu_shims()
    try:
        with shims:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                create_gloo_process_groups=False,
            )
            try:
                yield
            finally:
                groups = list(getattr(parallel_state, "_global_process_group_list", None) or [])
                parallel_state.destroy_model_parallel()
                parallel_state._global_process_group_list = None
                for group in groups:
                    if group is not None and group is not dist.group.WORLD:
                        with contextlib.suppress(ValueError, RuntimeError):
                            dist.destroy_process_group(group)
    finally:
        if created_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def fused_wgrad_kernel():
    """Yields which kernel Megatron's fused wgrad accumulation uses in this row.

    apex's ``fused_weight_gradient_mlp_cuda`` when it is installed; else a stand-in with the
    kernel's arithmetic (``cpu.core.wgrad_gemm_accum_fp32``: one GEMM with beta = 1 in
    fp32), bound into ``megatron.core.tensor_parallel.layers`` for this row only. On CPU the
    CPU shims (applied by :func:`megatron_single_process`) already bound it.
    """
    import types

    from megatron.core.tensor_parallel import layers

    from megatron_offload.integration.cpu import core as cpu_shims

    bound = getattr(layers, cpu_shims.FUSED_WGRAD_MODULE, None)
    if layers._grad_accum_fusion_available and bound is not None:
        stand_in = getattr(bound, "wgrad_gemm_accum_fp32", None) is cpu_shims.wgrad_gemm_accum_fp32
        yield "stand-in: main_grad += grad_output^T @ input (CPU shims)" if stand_in else (
            "apex fused_weight_gradient_mlp_cuda"
        )
        return
    module = types.ModuleType(cpu_shims.FUSED_WGRAD_MODULE)
    module.wgrad_gemm_accum_fp32 = cpu_shims.wgrad_gemm_accum_fp32
    module.wgrad_gemm_accum_fp16 = cpu_shims.wgrad_gemm_accum_fp16
    saved = layers._grad_accum_fusion_available, layers.__dict__.get(cpu_shims.FUSED_WGRAD_MODULE)
    layers._grad_accum_fusion_available = True
    layers.fused_weight_gradient_mlp_cuda = module
    try:
        yield "stand-in: main_grad += grad_output^T @ input (apex extension missing)"
    finally:
        layers._grad_accum_fusion_available = saved[0]
        if saved[1] is None:
            del layers.fused_weight_gradient_mlp_cuda
        else:
            layers.fused_weight_gradient_mlp_cuda = saved[1]


def _optimizer_context(device: torch.device):
    """On CPU, megatron-core's optimizer asks ``param.type()`` for 'torch.cuda.*' names."""
    if device.type == "cpu":
        from megatron_offload.integration.cpu.core import cuda_tensor_type_names

        return cuda_tensor_type_names()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------- model
def _transformer_config(row: RowSpec, size: RowSize, device: torch.device):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = device.type == "cpu"
    extra = {}
    if row.fp8_recipe is not None:
        extra.update(fp8="hybrid", fp8_recipe=row.fp8_recipe)
    return TransformerConfig(
        num_layers=size.layers_per_chunk,
        hidden_size=size.hidden,
        num_attention_heads=size.heads,
        ffn_hidden_size=4 * size.hidden,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        params_dtype=row.dtype,
        pipeline_dtype=row.dtype,
        bf16=row.bf16,
        use_cpu_initialization=on_cpu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Llama-style layer: RMSNorm, SwiGLU, no biases, RoPE
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=row.rope_fusion,
        gradient_accumulation_fusion=True,
        deallocate_pipeline_outputs=True,
        deterministic_mode=row.layer_spec == "te",
        **extra,
    )


def _build_model(row: RowSpec, size: RowSize, device: torch.device) -> list:
    """Rank 0's two chunks, each in megatron-core DDP, config funcs set as Megatron-LM does."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs

    config = _transformer_config(row, size, device)
    if row.layer_spec == "te":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=row.bf16, overlap_grad_reduce=True, use_distributed_optimizer=False
    )
    chunks = []
    for i in range(VPP):
        model = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=128,
            max_sequence_length=size.seq, pre_process=False, post_process=False,
            position_embedding_type="rope",
        )
        if device.type == "cuda":
            model.cuda(device)
        chunks.append(
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=model,
                                    disable_bucketing=i > 0)
        )
    config.no_sync_func = [chunk.no_sync for chunk in chunks]
    config.grad_sync_func = [chunk.start_grad_sync for chunk in chunks]  # align_grad_reduce
    config.param_sync_func = None
    config.finalize_model_grads_func = finalize_model_grads
    return chunks


def _build_optimizer(chunks: list, row: RowSpec, device: torch.device):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=1e-4, min_lr=1e-4, weight_decay=0.1, adam_beta1=0.9,
        adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, bf16=row.bf16, params_dtype=row.dtype,
        use_distributed_optimizer=False,
    )
    with _optimizer_context(device):
        optimizer = get_megatron_optimizer(config, chunks, use_gloo_process_groups=False)
    chunks[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _named_params(chunks: list) -> dict[str, torch.nn.Parameter]:
    return {
        f"{c}.{name}": p
        for c, chunk in enumerate(chunks)
        for name, p in torch.nn.Module.named_parameters(chunk)
    }


# ------------------------------------------------------------------------------- driving
class _Run:
    """One model copy, its optimizer and its iterations, with or without the offloader."""

    def __init__(self, chunks, optimizer, order, inputs, mask, device, offloader=None):
        from megatron.core.utils import get_model_config

        self.chunks, self.optimizer, self.order = chunks, optimizer, order
        self.inputs, self.mask, self.device = inputs, mask, device
        self.offloader = offloader
        self.config = get_model_config(chunks[0])
        self.iterations: list[dict] = []
        self.plan = None
        if offloader is not None:
            from megatron_offload.planning.policy import runtime_plan, units_to_offload

            offloader.register_model(chunks)
            self.offload_units = units_to_offload(order, offloader.config)
            layers = 0
            if offloader.config.granularity == "layer":
                from megatron_offload.integration.layers import attach_layer_hooks

                layers = attach_layer_hooks(offloader, chunks, self.config).layers_per_chunk
            self.plan = runtime_plan(order, self.offload_units, offloader.config, layers,
                                     synchronous_copies=not offloader.backend.asynchronous)

    def train_step(self) -> dict:
        """One iteration as Megatron-LM's ``train_step`` runs it: zero the grad buffers, the
        schedule (forward and backward of every microbatch, finalize_model_grads), then the
        optimizer step; records losses, main_grads, time, memory and offload statistics."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        if self.offloader is None:
            losses = _forward_backward(self)
        else:
            from megatron_offload.runtime.offloader import iteration

            with iteration(self.offloader, self.order, self.offload_units, plan=self.plan):
                losses = _forward_backward(self)
        if cuda:
            torch.cuda.synchronize(self.device)
        record = {"time_s": time.perf_counter() - start, "losses": losses}
        if cuda:
            record["peak_bytes"] = torch.cuda.max_memory_allocated(self.device) - base
            # informational: what the caching allocator held (the offload frees blocks that
            # the D2H stream still reads; they are reusable only once it has passed them)
            record["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        record["main_grads"] = {
            name: p.main_grad.detach().clone() for name, p in _named_params(self.chunks).items()
        }
        with _optimizer_context(self.device):
            success, grad_norm, _ = self.optimizer.step()
        record["step_ok"] = bool(success)
        record["grad_norm"] = None if grad_norm is None else float(grad_norm)
        if self.offloader is not None:
            stats = self.offloader.iteration_stats[-1]
            pool = self.offloader.pool
            record.update(
                offloaded_bytes=stats.offloaded_bytes, reloaded_bytes=stats.reloaded_bytes,
                offloaded_units=stats.offloaded_units, host_pool_bytes=pool.capacity_bytes,
                host_pool_pinned_bytes=pool.pinned_bytes,
            )
        self.iterations.append(record)
        return record


def _forward_backward(run: _Run) -> list[torch.Tensor]:
    """Rank 0's interleaved order through megatron-core's ``forward_step``/``backward_step``,
    with the interleaved schedule's grad-sync calls for pipeline rank 0."""
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import schedules

    from megatron_offload.releases import call_by_name
    from megatron_offload.schedule.kinds import OpKind

    chunks, config, offloader = run.chunks, run.config, run.offloader
    last = len(chunks) - 1
    no_sync_funcs = config.no_sync_func
    grad_sync_funcs = config.grad_sync_func
    no_sync_context = None

    def disable_grad_sync():
        nonlocal no_sync_context
        if no_sync_context is None:
            no_sync_context = contextlib.ExitStack()
            for func in no_sync_funcs:
                no_sync_context.enter_context(func())

    def enable_grad_sync():
        nonlocal no_sync_context
        if no_sync_context is not None:
            no_sync_context.close()
            no_sync_context = None

    received: dict = {}  # (chunk, mb) -> the input tensor "received" over p2p
    sent: dict = {}  # mb -> chunk 0's output as the next stage received it
    outputs: dict = {}
    grad_to_previous: dict = {}
    store: list = []
    synchronized: set[int] = set()

    def forward_step_func(data_iterator, model):
        output = model(input_ids=None, position_ids=None, attention_mask=run.mask)

        def loss_func(out):
            loss = out.float().square().mean()
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    disable_grad_sync()
    for op in run.order:
        key = (op.chunk, op.microbatch)
        if op.kind is OpKind.FORWARD:
            source = run.inputs[op.microbatch] if op.chunk == 0 else sent.pop(op.microbatch)
            x = source.detach().clone().requires_grad_(True)  # a received p2p tensor
            received[key] = x

            def step(chunk=op.chunk, mb=op.microbatch, x=x):
                return call_by_name(
                    schedules.forward_step, forward_step_func=forward_step_func,
                    data_iterator=None, model=chunks[chunk], num_microbatches=MICROBATCHES,
                    input_tensor=x, forward_data_store=store, config=config, cp_group_size=1,
                    is_first_microbatch=mb == 0, current_microbatch=mb,
                    is_last_stage=chunk == last,
                )

            result = step() if offloader is None else offloader.run_forward(key, [x], step)
            output = result[0]
            outputs[key] = output
            if op.chunk < last:
                # "send" it on, then pseudo-free it as the schedule does after the send
                sent[op.microbatch] = output.detach().clone()
                schedules.deallocate_output_tensor(output, config.deallocate_pipeline_outputs)
        elif op.kind is OpKind.BACKWARD:
            output = outputs[key]
            grad = None if op.chunk == last else grad_to_previous.pop(op.microbatch)

            def step(key=key, output=output, grad=grad):
                # model_type: 0.16 only (call_by_name drops it where the release lacks it)
                return call_by_name(
                    schedules.backward_step, input_tensor=received[key], output_tensor=output,
                    output_tensor_grad=grad, model_type=ModelType.encoder_or_decoder,
                    config=config,
                )

            if offloader is None:
                input_grad = step()
            else:
                input_grad = offloader.run_backward(offloader.unit_for_output(output), step)
            del outputs[key]
            received.pop(key)
            if op.chunk > 0:
                grad_to_previous[op.microbatch] = input_grad
            # rank 0 (pipeline_parallel_rank 0): a chunk's grads sync right after its last
            # microbatch's backward (schedules.backward_step_helper_postprocess)
            if op.microbatch == MICROBATCHES - 1:
                enable_grad_sync()
                grad_sync_funcs[op.chunk](chunks[op.chunk].parameters())
                synchronized.add(op.chunk)
            disable_grad_sync()
    enable_grad_sync()
    for chunk_id, chunk in enumerate(chunks):
        if chunk_id not in synchronized:
            grad_sync_funcs[chunk_id](chunk.parameters())
    config.finalize_model_grads_func(chunks, None, force_all_reduce=False)
    return [entry["loss"] for entry in store]


# ------------------------------------------------------------------------------ one row
def _differences(reference: _Run, offloaded: _Run, limit: int = 8) -> list[str]:
    diffs = []
    for i, (a, b) in enumerate(zip(reference.iterations, offloaded.iterations)):
        if len(a["losses"]) != len(b["losses"]) or not all(
            torch.equal(x, y) for x, y in zip(a["losses"], b["losses"])
        ):
            diffs.append(f"iteration {i}: losses differ")
        for name, grad in a["main_grads"].items():
            if not torch.equal(grad, b["main_grads"][name]):
                delta = (grad.float() - b["main_grads"][name].float()).abs().max().item()
                diffs.append(f"iteration {i}: main_grad {name} differs (max |diff| {delta:.3e})")
        if a["grad_norm"] != b["grad_norm"]:
            diffs.append(f"iteration {i}: grad norm {a['grad_norm']} vs {b['grad_norm']}")
    pa, pb = _named_params(reference.chunks), _named_params(offloaded.chunks)
    for name, p in pa.items():
        if not torch.equal(p, pb[name]):
            diffs.append(f"final weights: {name} differs")
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


def run_row(row: RowSpec | str, device: torch.device, size: RowSize = SMALL, *,
            iterations: int = 3, min_offload_bytes: int | None = None) -> dict:
    """Run one row (both copies, ``iterations`` each); needs :func:`megatron_single_process`."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_offload.config import OffloadConfig
    from megatron_offload.runtime.offloader import ActivationOffloader
    from megatron_offload.runtime.single_rank import interleaved_rank0_order
    from megatron_offload.runtime.transfer import make_backend

    if isinstance(row, str):
        row = next(r for r in ROWS if r.name == row)
    result = {
        "row": row.name, "spec": row.layer_spec, "dtype": str(row.dtype).replace("torch.", ""),
        "fp8": None if row.fp8_recipe is None else f"hybrid/{row.fp8_recipe}",
        "rope_fusion": row.rope_fusion, "gradient_accumulation_fusion": True,
        "granularity": row.granularity,
        "overlap_grad_reduce": True, "device": str(device), "size": asdict(size),
        "pipeline": f"rank 0 of PP={PP} VPP={VPP}, {MICROBATCHES} microbatches",
        "iterations": iterations,
    }
    reason = why_not_runnable(row, device)
    if reason is not None:
        result["not_run"] = reason
        return result
    result["dist_backend"] = str(dist.get_backend())
    order = interleaved_rank0_order(PP, VPP, MICROBATCHES)
    with fused_wgrad_kernel() as kernel:
        result["wgrad_kernel"] = kernel if row.layer_spec == "local" else (
            "Transformer Engine fuse_wgrad_accumulation (GEMM accumulating into main_grad)"
        )
        model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(1234)
        reference_chunks = _build_model(row, size, device)
        offload_chunks = _build_model(row, size, device)
        with torch.no_grad():  # same initial weights (before the optimizers copy them)
            ref_params = _named_params(reference_chunks)
            for name, p in _named_params(offload_chunks).items():
                p.copy_(ref_params[name])
        generator = torch.Generator().manual_seed(5)
        inputs = {
            mb: torch.randn(size.seq, size.micro_batch, size.hidden, generator=generator)
            .to(device=device, dtype=row.dtype)
            for mb in range(MICROBATCHES)
        }
        mask = None
        if row.layer_spec == "local":  # TE's causal attention builds its own
            mask = torch.triu(
                torch.ones(size.seq, size.seq, dtype=torch.bool, device=device), diagonal=1
            )[None, None]
        if min_offload_bytes is None:
            min_offload_bytes = 0 if device.type == "cpu" else 64 * 1024
        offloader = ActivationOffloader(
            OffloadConfig(policy="full", min_offload_bytes=min_offload_bytes,
                          granularity=row.granularity),
            make_backend("auto", device), device_type=device.type,
            rank_label=f"[gpu row {row.name}] ",
        )
        reference = _Run(reference_chunks, _build_optimizer(reference_chunks, row, device),
                         order, inputs, mask, device)
        offloaded = _Run(offload_chunks, _build_optimizer(offload_chunks, row, device),
                         order, inputs, mask, device, offloader)
        # All reference iterations first, then all offload iterations: FP8 delayed scaling
        # keeps global state per autocast, which interleaving two models would mix.
        for _ in range(iterations):
            reference.train_step()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # so that reserved memory says something about each run
        for _ in range(iterations):
            offloaded.train_step()
        diffs = _differences(reference, offloaded)
        result["bitwise_identical"] = not diffs
        result["differences"] = diffs
        result["losses"] = [[float(x) for x in it["losses"]] for it in reference.iterations]
        result["step_ok"] = [it["step_ok"] for it in offloaded.iterations]
        for key in ("offloaded_bytes", "reloaded_bytes", "offloaded_units", "host_pool_bytes",
                    "host_pool_pinned_bytes"):
            result[key] = [it[key] for it in offloaded.iterations]
        result["time_s_without_each"] = [it["time_s"] for it in reference.iterations]
        result["time_s_with_each"] = [it["time_s"] for it in offloaded.iterations]
        steady = slice(1, None) if iterations > 1 else slice(None)
        result["time_s_without"] = statistics.median(result["time_s_without_each"][steady])
        result["time_s_with"] = statistics.median(result["time_s_with_each"][steady])
        if device.type == "cuda":
            result["peak_bytes_without_each"] = [it["peak_bytes"] for it in reference.iterations]
            result["peak_bytes_with_each"] = [it["peak_bytes"] for it in offloaded.iterations]
            # steady state: the last iteration (iteration 0 shadows tensors it does not move)
            result["peak_bytes_without"] = result["peak_bytes_without_each"][-1]
            result["peak_bytes_with"] = result["peak_bytes_with_each"][-1]
            result["peak_reserved_bytes_without_each"] = [
                it["peak_reserved_bytes"] for it in reference.iterations
            ]
            result["peak_reserved_bytes_with_each"] = [
                it["peak_reserved_bytes"] for it in offloaded.iterations
            ]
        offloader.close()
    return result


def run_rows(device: torch.device, size: RowSize = SMALL, names=ROW_NAMES, *,
             iterations: int = 3, dist_backend: str | None = None) -> list[dict]:
    """Every row named, each reported; one that raises is reported with its error."""
    rows = [next(r for r in ROWS if r.name == name) for name in names]
    try:
        import megatron.core  # noqa: F401
    except ImportError as exc:
        return [{"row": r.name, "not_run": f"megatron-core not importable: {exc}"} for r in rows]
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    results = []
    with megatron_single_process(device, dist_backend):
        for row in rows:
            try:
                results.append(run_row(row, device, size, iterations=iterations))
            except Exception as exc:  # report it, and go on with the next row
                results.append({
                    "row": row.name, "device": str(device),
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=-12),
                })
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return results


__all__ = [
    "ROWS", "ROW_NAMES", "RowSpec", "RowSize", "SMALL", "GPU", "run_row", "run_rows",
    "megatron_single_process", "fused_wgrad_kernel", "why_not_runnable",
]
