"""Acceptance matrix: the plugin under the settings real Megatron-LM GPU jobs use.

Each row runs one tiny GPT twice in the same four gloo ranks through megatron-core's own
modules, schedules, DDP and optimizer: once unpatched, once with
``install(OffloadConfig(policy="full", min_offload_bytes=0, measure_memory=True))``. Three
iterations, each followed by a real optimizer step (megatron-core's Adam, lr 1e-3, clip 1.0),
so that iterations 1 and 2 start from weights the optimizer wrote. Compared bitwise, rank by
rank (same layout on both sides): each iteration's loss, every gradient (``main_grad``) as
that rank holds it, the optimizer's grad norm, and the parameters after the last step.

Knobs (``TinyGPTCase``): Megatron-LM's default GPU setup ("DEFAULT" below: fused wgrad
accumulation + overlapped grad reduce + distributed optimizer + bf16 with fp32 main
params), overlapped param gather (``param_sync_func`` with interleaving), distributed
optimizer off, fp32, a Llama-style layer (RoPE, SwiGLU, GQA, RMSNorm, no biases), selective
recompute of core_attn / layernorm (``CheckpointWithoutOutput``) / mlp, full recompute,
tied embeddings, sequence length changing between iterations, MoE (SequentialMLP, EP = 1),
PP = 2 with DP = 2 and PP = 4, without and with interleaving (VPP = 2).

Besides equality: on every rank whose schedule gives some unit a lifespan, the plugin must
really move bytes in every iteration, iteration 0 included, and bring back exactly what it
moved. Each row also checks that its knobs took effect (``facts``: the optimizer class, the
param / main_grad dtypes, the fused-wgrad stand-in's call count, the recompute flags on the
layers, ...), so a knob that Megatron silently ignored cannot make a row pass vacuously.

What megatron-core 0.16.1 cannot run on CPU, or at all, and is therefore not a row:
``recompute_modules=["mlp"]`` with biases (endless recursion in CheckpointFunction.backward:
the fc2 bias Parameter is returned through the checkpoint), MoE experts with biases at TP=1
(in-place write into a custom Function's view), the "alltoall" MoE token dispatcher (builds
a ``torch.cuda.Stream`` in ``__init__``); see ``TinyGPTCase.__post_init__`` and
``integration/cpu/core.py`` for the shims that make the rest run.
"""
from __future__ import annotations

import time

import pytest

from megatron_offload.config import OffloadConfig
from megatron_offload.testing.gpt import TinyGPTCase
from megatron_offload.testing.pool import session_pool
from megatron_offload.testing.reference import compare_runs_per_rank

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUN_CASE = "megatron_offload.testing.reference:run_case"
FULL = OffloadConfig(policy="full", granularity="unit", min_offload_bytes=0, measure_memory=True)
FULL_LAYERS = OffloadConfig(policy="full", granularity="layer", min_offload_bytes=0,
                            measure_memory=True)
ITERATIONS = 3

ADAM = dict(optimizer="adam", lr=1e-3, clip_grad=1.0)
DEFAULT = dict(  # Megatron-LM on GPUs: apex fused wgrad, --overlap-grad-reduce,
    gradient_accumulation_fusion=True,  # --use-distributed-optimizer, --bf16
    overlap_grad_reduce=True,
    use_distributed_optimizer=True,
    bf16=True,
    **ADAM,
)
LLAMA = dict(position_embedding_type="rope", swiglu=True, num_query_groups=2,
             normalization="RMSNorm", add_bias_linear=False)
SMALL_BUCKETS = dict(ddp_bucket_size=20_000)  # several buckets per chunk: reduced mid-backward


def _case(**kw) -> TinyGPTCase:
    kw.setdefault("num_layers", 4)
    kw.setdefault("microbatches", 4)
    return TinyGPTCase(**kw)


ROWS = [
    pytest.param(_case(pp=2, **DEFAULT, **SMALL_BUCKETS), id="gpt-pp2dp2-default"),
    pytest.param(_case(pp=2, overlap_param_gather=True, **LLAMA, **DEFAULT, **SMALL_BUCKETS),
                 id="llama-pp2dp2-default-paramgather"),
    pytest.param(_case(pp=2, vpp=2, overlap_param_gather=True, **LLAMA, **DEFAULT),
                 id="llama-pp2vpp2dp2-default-paramgather"),
    pytest.param(_case(pp=2, overlap_param_gather=True, align_param_gather=False, **DEFAULT,
                       **SMALL_BUCKETS),
                 id="gpt-pp2dp2-default-paramgather-unaligned"),
    pytest.param(_case(pp=4, microbatches=8, tie_embeddings=True, **DEFAULT),
                 id="gpt-pp4-default-tied"),
    pytest.param(_case(pp=4, vpp=2, num_layers=8, microbatches=8, **LLAMA, **DEFAULT),
                 id="llama-pp4vpp2-default"),
    pytest.param(_case(pp=4, recompute="selective", recompute_modules=("layernorm",), **DEFAULT),
                 id="gpt-pp4-recompute-layernorm-default"),
    pytest.param(_case(pp=2, vpp=2, recompute="selective", recompute_modules=("layernorm",),
                       **LLAMA, **DEFAULT),
                 id="llama-pp2vpp2dp2-recompute-layernorm-default"),
    pytest.param(_case(pp=2, recompute="selective", recompute_modules=("mlp",),
                       gradient_accumulation_fusion=True, use_distributed_optimizer=True,
                       **LLAMA, **ADAM),
                 id="llama-pp2dp2-recompute-mlp-fp32-noreduceoverlap"),
    pytest.param(_case(pp=4, vpp=2, num_layers=8, recompute="selective",
                       recompute_modules=("core_attn",), gradient_accumulation_fusion=True,
                       overlap_grad_reduce=True, **ADAM),
                 id="gpt-pp4vpp2-recompute-coreattn-fp32-nodistopt"),
    pytest.param(_case(pp=4, recompute="full", **LLAMA, **DEFAULT), id="llama-pp4-recompute-full"),
    pytest.param(_case(pp=2, seq_lengths=(32, 48, 32), **LLAMA, **DEFAULT),
                 id="llama-pp2dp2-varseq-default"),
    pytest.param(_case(pp=4, vpp=2, num_layers=8, seq_lengths=(32, 48, 32), tie_embeddings=True,
                       overlap_grad_reduce=True, **ADAM),
                 id="gpt-pp4vpp2-varseq-tied-fp32-nofusion"),
    pytest.param(_case(pp=2, num_moe_experts=4, **LLAMA, **DEFAULT), id="moe-pp2dp2-default"),
    pytest.param(_case(pp=4, num_moe_experts=4, moe_router_topk=2, recompute="selective",
                       recompute_modules=("layernorm", "core_attn"), **LLAMA, **ADAM),
                 id="moe-pp4-recompute-fp32-plainddp"),
]


def _pool(pool4):
    # A row that fails inside the schedule can leave the other ranks waiting; the pool is
    # then torn down and the next row gets a fresh one.
    return pool4 if pool4.alive() else session_pool(4)


def _lifespans(rank_order: str) -> list[int]:
    from megatron_offload.planning.policy import unit_lifespans
    from megatron_offload.schedule.ir import Op

    return list(unit_lifespans([Op.parse(t) for t in rank_order.split()]).values())


def check_facts(case: TinyGPTCase, ranks: list[dict]) -> list[str]:
    """Every knob of ``case`` took effect on every rank (see ``reference.model_facts``)."""
    problems = []
    for rank in ranks:
        f, where = rank["facts"], f"rank {rank['rank']}"

        def want(cond: bool, what: str, where=where, f=f) -> None:  # called in this iteration only
            if not cond:
                problems.append(f"{where}: {what} (facts: {f})")

        expected_optimizer = (
            "DistributedOptimizer" if case.use_distributed_optimizer
            else "Float16OptimizerWithFloat16Params" if case.bf16 else "FP32Optimizer")
        want(f["optimizer"] == "ChainedOptimizer" and f["optimizers"] == [expected_optimizer],
             f"optimizer is {expected_optimizer}")
        want(f["param_dtypes"] == ["torch.bfloat16" if case.bf16 else "torch.float32"],
             "param dtype")
        want(f["main_grad_dtypes"] == ["torch.float32"], "fp32 main_grad")
        want(all(f["float16_module"]) == case.bf16 and any(f["float16_module"]) == case.bf16,
             "Float16Module")
        want(f["ddp"]["overlap_grad_reduce"] == case.overlap_grad_reduce
             and f["ddp"]["use_distributed_optimizer"] == case.use_distributed_optimizer
             and f["ddp"]["overlap_param_gather"] == case.overlap_param_gather, "DDP config")
        want(f["grad_sync_func"] == case.overlap_grad_reduce, "config.grad_sync_func")
        want(f["param_sync_func"] == (case.overlap_param_gather and case.align_param_gather),
             "config.param_sync_func")
        if case.ddp_bucket_size is not None and rank["pp_rank"] == 0:
            # Megatron DDP buckets only the first pipeline stage's first chunk
            want(f["bucket_groups"][0] > 1, "several buckets in chunk 0")
        want(f["gradient_accumulation_fusion"] == case.gradient_accumulation_fusion,
             "config.gradient_accumulation_fusion")
        want((f["fused_wgrad_calls"] > 0) == case.gradient_accumulation_fusion,
             "the fused wgrad stand-in ran (and only with fusion)")
        layers = f["layers"]
        modules = set(case.recompute_modules or (("core_attn",) if case.recompute == "selective"
                                                 else ()))
        want(f["recompute_granularity"] == case.recompute, "recompute granularity")
        want(f["recompute_input_layernorm"] == (layers if "layernorm" in modules else 0)
             and f["recompute_pre_mlp_layernorm"] == (layers if "layernorm" in modules else 0),
             "layernorm recompute on every layer")
        dense = 0 if case.num_moe_experts else layers
        want(f["recompute_mlp"] == (dense if "mlp" in modules else 0), "mlp recompute")
        want(f["moe_layers"] == (layers if case.num_moe_experts else 0), "MoE layers")
        want(f["rotary"] == (case.position_embedding_type == "rope"), "RoPE")
        want(f["normalization"] == case.normalization, "normalization")
        want(f["gated_linear_unit"] == case.swiglu, "SwiGLU")
        want(f["num_query_groups"] == (case.num_query_groups or case.num_attention_heads),
             "GQA groups")
        seqs = [it["seq_length"] for it in rank["iterations"]]
        want(seqs == [case.seq_length_at(i) for i in range(len(seqs))], "sequence lengths")
        want(all(it["grad_norm"] is not None and it["step_ok"] for it in rank["iterations"]),
             "optimizer stepped with a grad norm")
    return problems


def check_offload_moved_bytes(patched: list[dict]) -> list[str]:
    """On every rank with a unit that has a lifespan: bytes moved and all of them came back,
    in every iteration (iteration 0 included)."""
    problems = []
    for rank in patched:
        stats_list = rank["offload_stats"]
        if len(stats_list) != ITERATIONS:
            problems.append(f"rank {rank['rank']}: {len(stats_list)} iteration stats")
        for stats in stats_list:
            if not any(life > 1 for life in _lifespans(stats["rank_order"])):  # > prefetch distance
                continue
            where = f"rank {rank['rank']} (pp {rank['pp_rank']}) iteration {stats['iteration']}"
            if stats["offloaded_bytes"] <= 0:
                problems.append(f"{where}: nothing offloaded")
            if stats["offloaded_bytes"] != stats["reloaded_bytes"]:
                problems.append(f"{where}: offloaded {stats['offloaded_bytes']} != reloaded "
                                f"{stats['reloaded_bytes']}")
    return problems


def run_row(pool, case: TinyGPTCase, offload=FULL) -> dict:
    """Reference and plugin run of one row; every problem found, and the timings."""
    t0 = time.perf_counter()
    reference = pool.run(RUN_CASE, case=case, iterations=ITERATIONS, offload_config=None,
                         timeout=60)
    t1 = time.perf_counter()
    patched = pool.run(RUN_CASE, case=case, iterations=ITERATIONS, offload_config=offload,
                       timeout=60)
    t2 = time.perf_counter()
    problems = check_facts(case, reference)
    if not any(it["loss_bytes"] for r in reference for it in r["iterations"]):
        problems.append("no rank reported a loss")
    problems += compare_runs_per_rank(reference, patched)
    problems += check_offload_moved_bytes(patched)
    return {"problems": problems, "reference": reference, "patched": patched,
            "seconds": (t1 - t0, t2 - t1)}


@pytest.mark.parametrize("case", ROWS)
def test_realistic_row_is_bitwise_identical_to_unpatched_megatron(pool4, case):
    result = run_row(_pool(pool4), case)
    ref_s, plugin_s = result["seconds"]
    print(f"\n[{case.label()}] reference {ref_s:.1f}s, plugin {plugin_s:.1f}s")
    problems = result["problems"]
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:25])


@pytest.mark.parametrize("case", ROWS)
def test_realistic_row_streaming_layers_is_bitwise_identical(pool4, case):
    """The same rows with --offload-granularity layer: per-layer hooks, saved tensors moved
    as each layer ends and brought back as each layer's backward starts."""
    result = run_row(_pool(pool4), case, FULL_LAYERS)
    problems = result["problems"]
    for rank in result["patched"]:
        for stats in rank["offload_stats"]:
            if stats["offloaded_bytes"] != stats["reloaded_bytes"]:
                problems.append(f"rank {rank['rank']} iteration {stats['iteration']}: "
                                f"offloaded {stats['offloaded_bytes']} != reloaded "
                                f"{stats['reloaded_bytes']}")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:25])


def test_every_knob_appears_in_a_row():
    cases = [p.values[0] for p in ROWS]

    def some(pred) -> bool:
        return any(pred(c) for c in cases)

    default = [c for c in cases if c.gradient_accumulation_fusion and c.overlap_grad_reduce
               and c.use_distributed_optimizer and c.bf16]
    assert len(default) >= 5
    for name, pred in {
        "fusion": lambda c: c.gradient_accumulation_fusion,
        "no fusion": lambda c: not c.gradient_accumulation_fusion,
        "overlap grad reduce": lambda c: c.overlap_grad_reduce,
        "no overlap grad reduce": lambda c: not c.overlap_grad_reduce,
        "param gather, interleaved": lambda c: c.overlap_param_gather and c.vpp,
        "param gather, 1F1B": lambda c: c.overlap_param_gather and not c.vpp,
        "param gather, not aligned (pre-hooks dispatch)": lambda c: (
            c.overlap_param_gather and not c.align_param_gather),
        "distributed optimizer": lambda c: c.use_distributed_optimizer,
        "no distributed optimizer": lambda c: not c.use_distributed_optimizer,
        "bf16": lambda c: c.bf16,
        "fp32": lambda c: not c.bf16,
        "adam everywhere": lambda c: c.optimizer == "adam",
        "llama": lambda c: (c.position_embedding_type == "rope" and c.swiglu
                            and c.num_query_groups and c.normalization == "RMSNorm"),
        "recompute core_attn": lambda c: "core_attn" in (c.recompute_modules or ()),
        "recompute layernorm": lambda c: "layernorm" in (c.recompute_modules or ()),
        "recompute mlp": lambda c: "mlp" in (c.recompute_modules or ()),
        "full recompute": lambda c: c.recompute == "full",
        "tied": lambda c: c.tie_embeddings,
        "variable seq": lambda c: c.seq_lengths is not None,
        "variable seq + rope": lambda c: c.seq_lengths and c.position_embedding_type == "rope",
        "moe": lambda c: c.num_moe_experts,
        "pp2 dp2": lambda c: c.pp == 2 and not c.vpp,
        "pp2 vpp2": lambda c: c.pp == 2 and c.vpp == 2,
        "pp4": lambda c: c.pp == 4 and not c.vpp,
        "pp4 vpp2": lambda c: c.pp == 4 and c.vpp == 2,
    }.items():
        assert some(pred), name
    assert all(c.optimizer == "adam" for c in cases)
