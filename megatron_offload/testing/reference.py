"""The runner that reference runs and plugin runs share, and a bitwise comparison.

``run_case(case, iterations, offload_config=None, fault=None)`` runs inside a pool worker
(``pool.run("megatron_offload.testing.reference:run_case", case=case)``): it (re)initializes
megatron-core's parallel state for the case, builds the tiny GPT, and runs ``iterations``
training iterations through ``megatron.core.pipeline_parallel.get_forward_backward_func()``
(forward and backward, finalize_model_grads included), then an optimizer step: by default
a plain SGD step on ``param.main_grad``; with ``case.optimizer="adam"`` megatron-core's own
optimizer (``get_megatron_optimizer``: FP32Optimizer, Float16OptimizerWithFloat16Params for
bf16, or DistributedOptimizer), driven as Megatron-LM's ``train_step`` drives it
(``zero_grad_buffer`` + ``optimizer.zero_grad()`` before, ``optimizer.step()`` after,
``config.grad_scale_func = optimizer.scale_loss``). It records per iteration the loss (last
pipeline stage), every gradient (``main_grad``) by layout-independent name as this rank
holds it, and the optimizer's returned grad norm, and returns them as CPU tensors.

``merge_ranks(per_rank)`` folds the ranks' records into one layout-independent record;
``compare_runs(a, b)`` lists every bitwise difference (empty = identical);
``compare_runs_per_rank(a, b)`` compares two runs of the same layout rank by rank (also
with the distributed optimizer, whose ranks hold different partially reduced gradients).

Fault injection (``fault={"iteration": i, "forward_raises_at": {pp_rank: microbatch}}``):
during iteration ``i`` the forward step function raises ``InjectedFault`` on pipeline rank
``pp_rank`` when it is called for microbatch ``microbatch`` of model chunk 0. The
microbatch of a call is the number of earlier forward calls of the same chunk in that
iteration (every schedule runs a chunk's microbatches in order 0..m-1). Only chunk 0's
calls can fault; a rank runs chunk 0's forwards of all its microbatches. The runner
catches the error (every rank must raise, or none: see below), records it, zeroes the grad
buffers and reruns the iteration from the same data and weights; the result must then be
bitwise equal to a run without the fault.

Choosing fault points that cannot deadlock is the caller's job: every message a rank posts
before it raises must be matched by its peer before the peer raises. ``SAFE_FAULT_PP2_M4``
is such a choice for 1F1B, PP=2, m=4 (batched p2p, all requests waited):

    rank 0: F0 sF0 | F1 [sF1 rB0] B0 | F2 [sF2 rB1] B1 | F3 X
    rank 1: rF0 | F0 B0 [sB0 rF1] | F1 B1 [sB1 rF2] | F2 X

Rank 1 raises at its forward of microbatch 2 after its last exchange (send grad 1, receive
activation 2) completed; rank 0 has posted exactly the matching exchange (send activation 2,
receive grad 1) and raises at microbatch 3 before posting anything else. No request is left
open on either side, so the rerun starts from a clean channel. Every rank must raise in the
faulted iteration (a rank that finishes the schedule would enter finalize_model_grads'
collectives alone and wait there until the pool's timeout). A rank that reaches the end
of the faulted iteration without raising records "no fault raised ..." in its ``faults``.
"""
from __future__ import annotations

import gc
import os
import struct
import time
from typing import Any

import torch

from megatron_offload.testing.gpt import (
    TinyGPTCase,
    build_model,
    global_param_names,
    synthetic_batch,
)

SAFE_FAULT_PP2_M4 = {"iteration": 1, "forward_raises_at": {0: 3, 1: 2}}
"""A fault that cannot deadlock: 1F1B, PP=2, microbatches=4 (see the module docstring)."""


class InjectedFault(RuntimeError):
    """Raised by the forward step function at the configured fault point."""


# --- parallel state -------------------------------------------------------------------------

_LAYOUT: tuple | None = None
"""(world size, pp, vpp) of the parallel state this worker holds, None = none."""


def init_parallel_state(case: TinyGPTCase) -> None:
    """Make megatron-core's parallel state match ``case``; reseed its RNG tracker.

    Runs in every worker of the pool (collective when groups are created). The
    data-parallel size is ``world_size / case.pp``. When the state already has this layout
    its process groups are kept (creating gloo groups costs sockets and time); otherwise
    the old state is released (``release_parallel_state``) and a new one initialized.
    """
    global _LAYOUT
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    world = dist.get_world_size()
    if world % case.pp:
        raise ValueError(f"world size {world} does not divide by {case.pp=}")
    layout = (world, case.pp, case.vpp)
    same = (
        _LAYOUT == layout
        and parallel_state.model_parallel_is_initialized()
        # someone else may have re-initialized megatron-core in this worker
        and parallel_state.get_pipeline_model_parallel_world_size() == case.pp
        and parallel_state.get_virtual_pipeline_model_parallel_world_size() == case.vpp
    )
    if not same:
        release_parallel_state()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=case.pp,
            virtual_pipeline_model_parallel_size=case.vpp,
            create_gloo_process_groups=False,
        )
        _LAYOUT = layout
    model_parallel_cuda_manual_seed(case.seed, force_reset_rng=True)
    torch.manual_seed(case.seed)


def release_parallel_state() -> None:
    """destroy_model_parallel, and destroy the process groups it only forgets.

    megatron-core's ``destroy_model_parallel`` sets its group globals to None but leaves the
    gloo groups alive, still referenced from reference cycles of the old model (measured:
    about 70 sockets per case per rank): a pool that runs many cases would run out of file
    descriptors. The groups this rank created are listed in
    ``parallel_state._global_process_group_list`` (``create_group``); one ``gc.collect()``
    (~0.2 s) frees the cycles that still hold them.
    """
    global _LAYOUT
    import torch.distributed as dist
    from megatron.core import parallel_state

    _LAYOUT = None
    groups = list(getattr(parallel_state, "_global_process_group_list", None) or [])
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state._global_process_group_list = None
    for group in groups:
        if group is None or group is dist.group.WORLD:
            continue
        try:
            dist.destroy_process_group(group)
        except (ValueError, RuntimeError):  # already gone / not a member
            pass
    if groups:
        gc.collect()


# --- the forward step ---------------------------------------------------------------------

class _MicrobatchIterator:
    """Yields one chunk's microbatches in order, each generated from (iteration, dp, j)."""

    def __init__(self, case: TinyGPTCase, iteration: int, dp_rank: int):
        self.case, self.iteration, self.dp_rank, self.next_mb = case, iteration, dp_rank, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.next_mb >= self.case.microbatches:
            raise StopIteration
        batch = synthetic_batch(self.case, iteration=self.iteration, dp_rank=self.dp_rank,
                                microbatch=self.next_mb)
        self.next_mb += 1
        return batch


def _loss_func(loss_mask_count: int, output_tensor: torch.Tensor):
    loss = output_tensor.float().sum() / loss_mask_count
    return loss, {"lm loss": loss.detach().clone()}


class _ForwardStep:
    """forward_step_func(data_iterator, model) with optional fault injection on chunk 0."""

    def __init__(self, case: TinyGPTCase, chunks: list, pp_rank: int, fault_at: int | None):
        self.case = case
        self.chunk_index = {id(c): i for i, c in enumerate(chunks)}
        self.fault_at = fault_at
        self.calls = [0] * len(chunks)

    def __call__(self, data_iterator, model):
        chunk = self.chunk_index[id(model)]
        microbatch = self.calls[chunk]
        self.calls[chunk] += 1
        if chunk == 0 and self.fault_at is not None and microbatch == self.fault_at:
            raise InjectedFault(f"injected fault at chunk 0 microbatch {microbatch}")
        batch = next(data_iterator)
        output = model(
            input_ids=batch["tokens"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        count = batch["labels"].numel()
        return output, lambda out: _loss_func(count, out)


# --- one run --------------------------------------------------------------------------------

def _zero_grads(chunks: list, optimizer=None) -> None:
    for chunk in chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()


def _collect_grads(chunks: list, case: TinyGPTCase) -> dict[str, torch.Tensor]:
    grads = {}
    for chunk in chunks:
        for name, param in global_param_names(chunk, tied=case.tie_embeddings).items():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            grads[name] = None if grad is None else grad.detach().clone().cpu()
    return grads


def _collect_params(chunks: list, case: TinyGPTCase) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone().cpu()
            for chunk in chunks
            for name, param in global_param_names(chunk, tied=case.tie_embeddings).items()}


@torch.no_grad()
def _sgd_step(chunks: list, lr: float) -> None:
    for chunk in chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is not None:
                param.data.add_(grad, alpha=-lr)


def build_optimizer(case: TinyGPTCase, chunks: list):
    """megatron-core's optimizer for ``case`` (``case.optimizer == "adam"``), as Megatron-LM
    builds it: Adam (torch's AdamW without apex/TE), weight decay 0.1, betas (0.9, 0.95),
    ``clip_grad``, bf16 with fp32 main params, optionally the distributed optimizer. Sets
    ``config.grad_scale_func = optimizer.scale_loss`` like Megatron-LM's training loop."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.utils import get_model_config

    from megatron_offload.integration.cpu.core import cuda_tensor_type_names

    config = OptimizerConfig(
        optimizer="adam", lr=case.lr, min_lr=case.lr, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=case.clip_grad,
        bf16=case.bf16, params_dtype=torch.bfloat16 if case.bf16 else torch.float32,
        use_distributed_optimizer=case.use_distributed_optimizer,
        overlap_param_gather=case.overlap_param_gather,
    )
    with cuda_tensor_type_names():
        optimizer = get_megatron_optimizer(config, chunks, use_gloo_process_groups=False)
    get_model_config(chunks[0]).grad_scale_func = optimizer.scale_loss
    return optimizer


def _optimizer_step(optimizer) -> tuple[bool, float | None]:
    from megatron_offload.integration.cpu.core import cuda_tensor_type_names

    with cuda_tensor_type_names():
        success, grad_norm, _ = optimizer.step()
    return bool(success), (None if grad_norm is None else float(grad_norm))


def model_facts(case: TinyGPTCase, chunks: list, optimizer) -> dict[str, Any]:
    """What the built model, DDP and optimizer really are on this rank (so that a test can
    tell that a knob took effect instead of being silently ignored)."""
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.utils import get_model_config

    from megatron_offload.testing.gpt import unwrap

    config = get_model_config(chunks[0])
    layers = [layer for chunk in chunks for layer in unwrap(chunk).decoder.layers]
    params = [p for chunk in chunks for p in chunk.parameters()]
    return {
        "optimizer": None if optimizer is None else type(optimizer).__name__,
        # get_megatron_optimizer (0.16.1) always returns a ChainedOptimizer
        "optimizers": [type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [])],
        "param_dtypes": sorted({str(p.dtype) for p in params}),
        "main_grad_dtypes": sorted({str(p.main_grad.dtype) for p in params
                                    if getattr(p, "main_grad", None) is not None}),
        "float16_module": [isinstance(chunk.module, Float16Module) for chunk in chunks],
        "bucket_groups": [len(chunk.bucket_groups) for chunk in chunks],
        "ddp": {k: getattr(chunks[0].ddp_config, k) for k in (
            "overlap_grad_reduce", "overlap_param_gather", "align_param_gather",
            "use_distributed_optimizer", "grad_reduce_in_fp32")},
        "grad_sync_func": config.grad_sync_func is not None,
        "param_sync_func": config.param_sync_func is not None,
        "gradient_accumulation_fusion": bool(config.gradient_accumulation_fusion),
        "layers": len(layers),
        "recompute_input_layernorm": sum(bool(getattr(layer, "recompute_input_layernorm", False))
                                         for layer in layers),
        "recompute_pre_mlp_layernorm": sum(
            bool(getattr(layer, "recompute_pre_mlp_layernorm", False)) for layer in layers),
        "recompute_mlp": sum(bool(getattr(layer, "recompute_mlp", False)) for layer in layers),
        "recompute_granularity": config.recompute_granularity,
        "recompute_modules": list(config.recompute_modules or []),
        "moe_layers": sum(isinstance(layer.mlp, MoELayer) for layer in layers),
        "rotary": any(getattr(unwrap(c), "rotary_pos_emb", None) is not None for c in chunks),
        "normalization": config.normalization,
        "gated_linear_unit": bool(config.gated_linear_unit),
        "num_query_groups": config.num_query_groups,
    }


def _float_bytes(value: float | None) -> bytes | None:
    return None if value is None else struct.pack("<d", value)


class _ParamGatherHooks:
    """Megatron-LM's handling of ``overlap_param_gather`` forward pre-hooks: off (and
    ``config.param_sync_func`` None) for the first iteration, on after its optimizer step
    (``training.py``: ``disable_forward_pre_hook(model, param_sync=False)`` before the loop,
    ``enable_forward_pre_hook`` once ``iteration == start_iteration`` succeeded)."""

    def __init__(self, case: TinyGPTCase, chunks: list):
        from megatron.core.utils import get_model_config

        self.active = case.overlap_param_gather
        self.chunks = chunks
        self.config = get_model_config(chunks[0])
        self.param_sync_func = None
        if self.active:
            for chunk in chunks:
                chunk.disable_forward_pre_hook(param_sync=False)
            self.param_sync_func = self.config.param_sync_func
            self.config.param_sync_func = None

    def after_first_step(self) -> None:
        if self.active:
            for chunk in self.chunks:
                chunk.enable_forward_pre_hook()
            self.config.param_sync_func = self.param_sync_func
            self.active = False


def _one_iteration(case, chunks, fb_func, iteration, dp_rank, pp_rank, fault_at,
                   optimizer=None):
    data = [_MicrobatchIterator(case, iteration, dp_rank) for _ in chunks]
    forward_step = _ForwardStep(case, chunks, pp_rank, fault_at)
    _zero_grads(chunks, optimizer)
    seq_length = case.seq_length_at(iteration)
    store = fb_func(
        forward_step_func=forward_step,
        data_iterator=data if len(chunks) > 1 else data[0],
        model=chunks,
        num_microbatches=case.microbatches,
        seq_length=seq_length,
        micro_batch_size=case.micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=False,
    )
    return store


def ensure_cpu_shims(*, keep_async_send_storage: bool = True) -> None:
    """Apply the CPU shims (no GPU only) with these options, re-applying if they differ."""
    from megatron_offload.integration.cpu import core as cpu_shims

    current = cpu_shims.applied_options()
    if current and current.get("keep_async_send_storage") != keep_async_send_storage:
        cpu_shims.remove_cpu_shims()
    cpu_shims.apply_cpu_shims(keep_async_send_storage=keep_async_send_storage)


def run_case(case: TinyGPTCase | dict, iterations: int = 3, offload_config=None,
             fault: dict | None = None, *, keep_async_send_storage: bool = True) -> dict:
    """Train ``case`` for ``iterations`` iterations on this rank; return the record.

    Returns ``{"rank", "pp_rank", "dp_rank", "dp_size", "case", "iterations": [ {"loss":
    float | None, "loss_bytes": bytes | None, "microbatch_losses": list[float] | None,
    "grads": {global name: tensor}, "grad_norm": float | None, "grad_norm_bytes": bytes |
    None, "step_ok": bool | None, "seq_length": int} ], "final_params": {global name:
    tensor}, "facts": model_facts(...) + {"fused_wgrad_calls": int}, "faults": [str],
    "timing": {...}}`` and, with ``offload_config``,
    ``"offload_stats": [runtime.iteration_stats[-1].as_dict(), ...]`` and ``"offload_plan"``:
    policy auto's decisions (``integration.auto.AutoDecision.report()``, one per schedule
    shape; [] for other policies). Loss fields are None
    except on the last pipeline stage; ``grad_norm`` / ``step_ok`` are None with the plain SGD
    step. ``grads`` are taken after the schedule returned (finalize_model_grads done), before
    the optimizer step; ``final_params`` after the last step. With both ``fault`` and
    ``offload_config``, ``"offload_clean_after_fault"`` says whether the plugin's runtime
    held no tensor and was not mid-iteration right after the faulted attempt.
    ``keep_async_send_storage=False`` runs without the Trap 2 shim (to show it is needed).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_offload.integration.cpu import core as cpu_shims

    if isinstance(case, dict):
        case = TinyGPTCase(**case)
    ensure_cpu_shims(keep_async_send_storage=keep_async_send_storage)
    t0 = time.perf_counter()
    init_parallel_state(case)
    try:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        chunks = build_model(case)
        optimizer = build_optimizer(case, chunks) if case.megatron_optimizer else None
        facts = model_facts(case, chunks, optimizer)  # before the first iteration's hooks
        param_gather_hooks = _ParamGatherHooks(case, chunks)
        t_built = time.perf_counter()
        result: dict[str, Any] = {
            "rank": dist.get_rank(), "pp_rank": pp_rank, "dp_rank": dp_rank,
            "dp_size": dp_size, "case": case.as_dict(), "iterations": [], "faults": [],
            "facts": facts,
        }
        fused_before = sum(cpu_shims.fused_wgrad_calls().values())
        fault_iteration = None if fault is None else fault["iteration"]
        fault_at = None
        if fault is not None:
            points = {int(k): v for k, v in fault["forward_raises_at"].items()}
            fault_at = points.get(pp_rank)

        runtime = None
        if offload_config is not None:
            from megatron_offload.integration.megatron_core import install, uninstall

            runtime = install(offload_config)
            result["offload_stats"] = []
        try:
            step_times = []
            for it in range(iterations):
                fb_func = get_forward_backward_func()
                ts = time.perf_counter()
                if it == fault_iteration:
                    try:
                        _one_iteration(case, chunks, fb_func, it, dp_rank, pp_rank, fault_at,
                                       optimizer)
                    except InjectedFault as exc:
                        result["faults"].append(f"iteration {it}: {exc}")
                    else:
                        result["faults"].append(
                            f"iteration {it}: no fault raised on pp rank {pp_rank} "
                            f"(fault point {fault_at})"
                        )
                    if runtime is not None:
                        result["offload_clean_after_fault"] = _runtime_holds_nothing(runtime)
                    fb_func = get_forward_backward_func()
                store = _one_iteration(case, chunks, fb_func, it, dp_rank, pp_rank, None,
                                       optimizer)
                step_times.append(time.perf_counter() - ts)  # forward-backward only
                record: dict[str, Any] = {"loss": None, "loss_bytes": None,
                                          "microbatch_losses": None,
                                          "seq_length": case.seq_length_at(it)}
                if is_last:
                    losses = torch.stack([d["lm loss"] for d in store]).cpu()
                    record["microbatch_losses"] = losses.tolist()
                    record["loss"] = float(losses.mean())
                    record["loss_bytes"] = losses.numpy().tobytes()
                record["grads"] = _collect_grads(chunks, case)
                if runtime is not None:
                    result["offload_stats"].append(runtime.iteration_stats[-1].as_dict())
                if optimizer is None:
                    _sgd_step(chunks, case.lr)
                    record["step_ok"], record["grad_norm"] = None, None
                else:
                    record["step_ok"], record["grad_norm"] = _optimizer_step(optimizer)
                    if it == 0:
                        param_gather_hooks.after_first_step()
                record["grad_norm_bytes"] = _float_bytes(record["grad_norm"])
                result["iterations"].append(record)
        finally:
            if offload_config is not None:
                result["offload_plan"] = [d.report() for d in runtime.auto.values()]
                uninstall()
        result["final_params"] = _collect_params(chunks, case)
        result["facts"]["fused_wgrad_calls"] = (
            sum(cpu_shims.fused_wgrad_calls().values()) - fused_before)
        result["timing"] = {"build_s": t_built - t0, "step_s": step_times,
                            "total_s": time.perf_counter() - t0, "pid": os.getpid()}
        return result
    except BaseException:
        # p2p channels may hold unmatched messages: start the next case on fresh groups
        release_parallel_state()
        raise


def _runtime_holds_nothing(runtime) -> bool:
    """The plugin's runtime between iterations: not mid-iteration, no tensor referenced."""
    offloader = getattr(runtime, "offloader", None)
    if getattr(runtime, "active", False):
        return False
    return offloader is None or bool(offloader.holds_no_tensors())


def _last_stage_losses(store) -> list[bytes]:
    return [d["lm loss"].detach().cpu().numpy().tobytes() for d in store]


def run_forward_only(case: TinyGPTCase | dict, offload_config=None) -> dict:
    """One forward-only pass (``forward_only=True``) without, then with the plugin.

    Returns ``{"losses_unpatched", "losses_patched"}`` (per-microbatch loss bytes on the
    last pipeline stage, [] elsewhere) and ``"stats_recorded"``: how many iteration stats
    the plugin's runtime recorded during the forward-only pass (expected 0: forward-only
    passes through). Runs in a pool worker like ``run_case``.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if isinstance(case, dict):
        case = TinyGPTCase(**case)
    ensure_cpu_shims()
    init_parallel_state(case)
    try:
        dp_rank = parallel_state.get_data_parallel_rank()
        chunks = build_model(case)

        def forward_only() -> list[bytes]:
            data = [_MicrobatchIterator(case, 0, dp_rank) for _ in chunks]
            store = get_forward_backward_func()(
                forward_step_func=_ForwardStep(case, chunks, 0, None),
                data_iterator=data if len(chunks) > 1 else data[0],
                model=chunks, num_microbatches=case.microbatches,
                seq_length=case.seq_length, micro_batch_size=case.micro_batch_size,
                decoder_seq_length=case.seq_length, forward_only=True,
            )
            return _last_stage_losses(store)

        unpatched = forward_only()
        stats = 0
        patched = unpatched
        if offload_config is not None:
            from megatron_offload.integration.megatron_core import install, uninstall

            runtime = install(offload_config)
            try:
                before = len(runtime.iteration_stats)
                patched = forward_only()
                stats = len(runtime.iteration_stats) - before
            finally:
                uninstall()
        return {"losses_unpatched": unpatched, "losses_patched": patched,
                "stats_recorded": stats}
    except BaseException:
        release_parallel_state()
        raise


# --- comparison -----------------------------------------------------------------------------

def merge_ranks(per_rank: list[dict]) -> dict:
    """One layout-independent record from ``pool.run(... run_case ...)``'s list.

    ``{"dp_size", "iterations": [{"loss": {dp_rank: bytes}, "grads": {name: tensor}}],
    "conflicts": [str], "faults": [str], "case"}``. Gradients are taken from data-parallel
    rank 0 (they are all-reduced); a name reported by two pipeline ranks (a tied embedding)
    or by two dp ranks with different bytes is listed in ``conflicts``.
    """
    if isinstance(per_rank, dict) and "iterations" in per_rank and "conflicts" in per_rank:
        return per_rank
    n_iter = len(per_rank[0]["iterations"])
    merged = {"dp_size": per_rank[0]["dp_size"], "case": per_rank[0]["case"],
              "iterations": [], "conflicts": [], "faults": []}
    for r in per_rank:
        merged["faults"].extend(f"rank {r['rank']}: {f}" for f in r["faults"])
    for it in range(n_iter):
        losses: dict[int, bytes] = {}
        grads: dict[str, torch.Tensor] = {}
        for r in per_rank:
            rec = r["iterations"][it]
            if rec["loss_bytes"] is not None:
                losses[r["dp_rank"]] = rec["loss_bytes"]
            for name, g in rec["grads"].items():
                if name in grads:
                    if not _same(grads[name], g):
                        merged["conflicts"].append(
                            f"iteration {it}: {name} differs between ranks (rank {r['rank']})")
                    continue
                grads[name] = g
        merged["iterations"].append({"loss": losses, "grads": grads})
    return merged


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8)))


def compare_runs(a, b) -> list[str]:
    """Every bitwise mismatch between two runs (per-rank lists or merged records).

    Compares per iteration: each dp rank's loss bytes, the set of gradient names, and each
    gradient's dtype, shape and bytes; also reports merge conflicts and iteration counts.
    Empty list = identical.
    """
    a, b = merge_ranks(a), merge_ranks(b)
    out = [f"a: {c}" for c in a["conflicts"]] + [f"b: {c}" for c in b["conflicts"]]
    if len(a["iterations"]) != len(b["iterations"]):
        out.append(f"iterations: {len(a['iterations'])} != {len(b['iterations'])}")
    for it, (ra, rb) in enumerate(zip(a["iterations"], b["iterations"])):
        if ra["loss"] != rb["loss"]:
            for dp in sorted(set(ra["loss"]) | set(rb["loss"])):
                la, lb = ra["loss"].get(dp), rb["loss"].get(dp)
                if la != lb:
                    out.append(f"iteration {it}: loss of dp rank {dp} differs: "
                               f"{_loss_repr(la)} vs {_loss_repr(lb)}")
        names_a, names_b = set(ra["grads"]), set(rb["grads"])
        for name in sorted(names_a - names_b):
            out.append(f"iteration {it}: grad {name} only in a")
        for name in sorted(names_b - names_a):
            out.append(f"iteration {it}: grad {name} only in b")
        for name in sorted(names_a & names_b):
            ga, gb = ra["grads"][name], rb["grads"][name]
            if not _same(ga, gb):
                detail = ""
                if ga is not None and gb is not None and ga.shape == gb.shape:
                    detail = f" (max abs diff {(ga.double() - gb.double()).abs().max().item():.3e})"
                out.append(f"iteration {it}: grad {name} differs{detail}")
    return out


def _tensor_diffs(where: str, ta: dict, tb: dict) -> list[str]:
    out = []
    for name in sorted(set(ta) - set(tb)):
        out.append(f"{where}: {name} only in a")
    for name in sorted(set(tb) - set(ta)):
        out.append(f"{where}: {name} only in b")
    for name in sorted(set(ta) & set(tb)):
        ga, gb = ta[name], tb[name]
        if not _same(ga, gb):
            detail = ""
            if ga is not None and gb is not None and ga.shape == gb.shape:
                diff = (ga.double() - gb.double()).abs().max().item()
                detail = f" (max abs diff {diff:.3e})"
            out.append(f"{where}: {name} differs{detail}")
    return out


def compare_runs_per_rank(a: list[dict], b: list[dict]) -> list[str]:
    """Every bitwise mismatch between two runs of the same layout, rank by rank.

    Per rank and iteration: the loss bytes (last stage), the sequence length, every
    gradient as that rank holds it (name set, dtype, shape, bytes), the optimizer's grad
    norm (bytes of the float) and step success; per rank the parameters after the last
    step. Unlike ``compare_runs`` nothing is merged, so runs whose data-parallel ranks hold
    different gradients (distributed optimizer: only the own shard is fully reduced) compare
    too. Empty list = identical.
    """
    out = []
    if len(a) != len(b):
        return [f"ranks: {len(a)} != {len(b)}"]
    for ra, rb in zip(sorted(a, key=lambda r: r["rank"]), sorted(b, key=lambda r: r["rank"])):
        rank = ra["rank"]
        if rb["rank"] != rank or (ra["pp_rank"], ra["dp_rank"]) != (rb["pp_rank"], rb["dp_rank"]):
            out.append(f"rank {rank}: layouts differ ({ra['pp_rank']}, {ra['dp_rank']}) vs "
                       f"({rb['pp_rank']}, {rb['dp_rank']})")
            continue
        if len(ra["iterations"]) != len(rb["iterations"]):
            out.append(f"rank {rank}: iterations {len(ra['iterations'])} != "
                       f"{len(rb['iterations'])}")
        for it, (ia, ib) in enumerate(zip(ra["iterations"], rb["iterations"])):
            where = f"rank {rank} iteration {it}"
            if ia.get("seq_length") != ib.get("seq_length"):
                out.append(f"{where}: seq_length {ia.get('seq_length')} vs {ib.get('seq_length')}")
            if ia["loss_bytes"] != ib["loss_bytes"]:
                out.append(f"{where}: loss differs: {_loss_repr(ia['loss_bytes'])} vs "
                           f"{_loss_repr(ib['loss_bytes'])}")
            if ia.get("grad_norm_bytes") != ib.get("grad_norm_bytes"):
                out.append(f"{where}: grad norm differs: {ia.get('grad_norm')!r} vs "
                           f"{ib.get('grad_norm')!r}")
            if ia.get("step_ok") != ib.get("step_ok"):
                out.append(f"{where}: step_ok {ia.get('step_ok')} vs {ib.get('step_ok')}")
            out += _tensor_diffs(f"{where}: grad", ia["grads"], ib["grads"])
        if "final_params" in ra or "final_params" in rb:
            out += _tensor_diffs(f"rank {rank} after the last step: param",
                                 ra.get("final_params", {}), rb.get("final_params", {}))
    return out


def _loss_repr(raw: bytes | None) -> str:
    if raw is None:
        return "None"
    t = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    return f"mean {float(t.mean()):.9g}"


__all__ = [
    "run_case", "ensure_cpu_shims", "merge_ranks", "compare_runs", "compare_runs_per_rank",
    "build_optimizer", "model_facts", "init_parallel_state",
    "release_parallel_state", "run_forward_only", "InjectedFault",
    "SAFE_FAULT_PP2_M4",
]
