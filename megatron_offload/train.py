"""`megatron-offload train`: a real pipeline-parallel GPT training run on megatron-core.

Spawns ``--nproc`` ranks (gloo on CPU), builds a GPT from Megatron-LM's own model flags, and
trains it through Megatron-Core's unmodified schedules with the offload plugin installed. By
default it first trains the same model, weights and data without offload, so the report shows
per-rank activation memory with and without offload, and checks that losses and every
gradient are bitwise identical.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

from megatron_offload.config import POLICIES, OffloadConfig

def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a GPT with pipeline parallelism and activation offload (CPU: gloo ranks)",
        description=(
            "Train a GPT on megatron-core with pipeline parallelism and PipeOffload. On a "
            "CPU-only machine it spawns --nproc gloo ranks. Takes Megatron-LM's own flag names."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model (Megatron-LM flags)")
    model.add_argument("--num-layers", type=int, default=8)
    model.add_argument("--hidden-size", type=int, default=128)
    model.add_argument("--num-attention-heads", type=int, default=4)
    model.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden")
    model.add_argument("--seq-length", type=int, default=64)
    model.add_argument("--vocab-size", type=int, default=256)
    model.add_argument("--micro-batch-size", type=int, default=2)
    model.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="default: 2 x PP microbatches per data-parallel rank",
    )
    model.add_argument(
        "--untie-embeddings-and-output-weights", action="store_true", help="untied output layer"
    )
    model.add_argument(
        "--recompute-granularity", choices=["full", "selective"], default=None,
        help="activation recomputation (full: every layer, uniform)",
    )
    parallel = parser.add_argument_group("parallelism (Megatron-LM flags)")
    parallel.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=4)
    parallel.add_argument(
        "--num-virtual-stages-per-pipeline-rank", "--vpp", type=int, default=2,
        help="model chunks per rank (interleaved 1F1B); 1 = plain 1F1B",
    )
    parallel.add_argument(
        "--num-layers-per-virtual-pipeline-stage", type=int, default=None,
        help="alternative to --num-virtual-stages-per-pipeline-rank",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--train-iters", type=int, default=5)
    run.add_argument("--nproc", type=int, default=4, help="ranks to spawn (world size)")
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    run.add_argument("--seed", type=int, default=1234)
    run.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    run.add_argument(
        "--no-baseline", action="store_true",
        help="skip the run without offload (no with/without comparison)",
    )
    run.add_argument("--json", action="store_true", help="print the results as JSON only")
    offload = parser.add_argument_group("offload")
    offload.add_argument(
        "--pipeline-offload", action=argparse.BooleanOptionalAction, default=True,
        help="offload activations (--no-pipeline-offload runs Megatron unpatched)",
    )
    offload.add_argument("--offload-policy", choices=POLICIES, default="full")
    offload.add_argument("--offload-chunks", type=int, default=None, help="K for policy chunks")
    offload.add_argument(
        "--offload-memory-budget-gib", type=float, default=None,
        help="policy auto: the most activation memory one rank may keep resident (saved "
        "activations + received inputs, GiB); the planner picks the fewest units that fit",
    )
    offload.add_argument(
        "--offload-min-bytes", type=int, default=0,
        help="saved tensors below this stay on the device (0 on CPU: the demo model is tiny)",
    )
    offload.add_argument(
        "--offload-host-budget-gib", type=float, default=None,
        help="most host memory the offload pool of one rank may hold (default: half the "
        "node's available RAM divided by the ranks on the node)",
    )
    offload.add_argument(
        "--offload-report", action=argparse.BooleanOptionalAction, default=True,
        help="measure resident activation bytes per rank (weak references to storages)",
    )
    parser.set_defaults(_parser=parser)
    return parser


def _case_from_args(args, parser):
    from megatron_offload.testing.gpt import TinyGPTCase

    pp = args.pipeline_model_parallel_size
    if pp < 1 or args.nproc % pp:
        parser.error(
            f"--pipeline-model-parallel-size {pp} must divide --nproc {args.nproc} "
            "(data-parallel size = nproc / pp)"
        )
    dp = args.nproc // pp
    vpp = args.num_virtual_stages_per_pipeline_rank
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_rank = args.num_layers // pp
        if per_rank % args.num_layers_per_virtual_pipeline_stage:
            parser.error(
                f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage}"
                f" must divide the {per_rank} layers per pipeline rank"
            )
        vpp = per_rank // args.num_layers_per_virtual_pipeline_stage
    if vpp < 1 or args.num_layers % (pp * vpp):
        parser.error(
            f"--num-layers {args.num_layers} must divide by PP x VPP = {pp} x {vpp}; change "
            "--num-layers or --num-virtual-stages-per-pipeline-rank"
        )
    per_step = args.micro_batch_size * dp
    gbs = args.global_batch_size or 2 * pp * per_step
    if gbs % per_step:
        parser.error(
            f"--global-batch-size {gbs} must divide by micro-batch-size x data-parallel size "
            f"= {per_step}"
        )
    microbatches = gbs // per_step
    if vpp > 1 and (microbatches % pp != 0):
        parser.error(
            f"interleaving needs the microbatches per rank ({microbatches}) to be a multiple of "
            f"--pipeline-model-parallel-size {pp}; use --global-batch-size {2 * pp * per_step}"
        )
    return TinyGPTCase(
        pp=pp,
        vpp=vpp if vpp > 1 else None,
        microbatches=microbatches,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        vocab_size=args.vocab_size,
        tie_embeddings=not args.untie_embeddings_and_output_weights,
        recompute=args.recompute_granularity,
        seed=args.seed,
        lr=args.lr,
    )


def _offload_config(args, parser) -> OffloadConfig | None:
    if not args.pipeline_offload:
        return None
    try:
        return OffloadConfig(
            policy=args.offload_policy,
            offload_chunks=args.offload_chunks,
            memory_budget_gib=args.offload_memory_budget_gib,
            min_offload_bytes=args.offload_min_bytes,
            measure_memory=args.offload_report,
            host_budget_gib=args.offload_host_budget_gib,
            backend="cpu" if args.device == "cpu" else "auto",
        )
    except ValueError as error:
        parser.error(str(error))


def run(args) -> int:
    parser = args._parser
    if args.device == "cuda":
        parser.error(
            "--device cuda: multi-GPU training through this command arrives with the "
            "launcher issue; on GPUs use scripts/gpu_check.sh, or --device cpu here"
        )
    case = _case_from_args(args, parser)
    offload = _offload_config(args, parser)
    if offload is not None:
        try:
            offload.check_against_model(case.num_chunks)
        except ValueError as error:
            parser.error(str(error))
    from megatron_offload.testing.pool import WorkerPool
    from megatron_offload.testing.reference import compare_runs

    baseline_config = OffloadConfig(policy="none", measure_memory=True, min_offload_bytes=0)
    started = time.perf_counter()
    with WorkerPool(args.nproc) as pool:
        target = "megatron_offload.testing.reference:run_case"
        baseline = None
        if not args.no_baseline or offload is None:
            if not args.json:
                print("[train] baseline run: Megatron's schedules, no offload ...", file=sys.stderr)
            baseline = pool.run(
                target, case=case, iterations=args.train_iters,
                offload_config=baseline_config if offload is not None else None,
            )
        with_offload = None
        if offload is not None:
            if not args.json:
                print(f"[train] offload run: policy {offload.policy} ...", file=sys.stderr)
            with_offload = pool.run(
                target, case=case, iterations=args.train_iters, offload_config=offload
            )
    elapsed = time.perf_counter() - started
    mismatches = (
        compare_runs(baseline, with_offload) if baseline is not None and with_offload else []
    )
    result = summarize(case, baseline, with_offload, mismatches, offload)
    result["wall_time_s"] = elapsed
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_report(case, result, offload))
    return 1 if mismatches else 0


def _by_pp_rank(ranks):
    """One record per pipeline rank (data-parallel rank 0)."""
    return sorted((r for r in ranks if r["dp_rank"] == 0), key=lambda r: r["pp_rank"])


def _losses(ranks) -> list[float]:
    last = [r for r in ranks if r["dp_rank"] == 0 and r["iterations"][0]["loss"] is not None][0]
    return [it["loss"] for it in last["iterations"]]


def _grad_norms(ranks) -> list[float]:
    from megatron_offload.testing.reference import merge_ranks

    merged = merge_ranks(ranks)
    norms = []
    for it in merged["iterations"]:
        total = sum(float(g.double().pow(2).sum()) for g in it["grads"].values() if g is not None)
        norms.append(math.sqrt(total))
    return norms


def summarize(case, baseline, with_offload, mismatches, offload) -> dict:
    main = with_offload or baseline
    ranks = _by_pp_rank(main)
    result = {
        "losses": _losses(main),
        "grad_norms": _grad_norms(main),
        "iteration_time_s": [
            sum(r["timing"]["step_s"][i] for r in ranks) / len(ranks)
            for i in range(len(ranks[0]["timing"]["step_s"]))
        ],
        "pipeline_parallel_size": case.pp,
        "virtual_pipeline_size": case.vpp or 1,
        "microbatches": case.microbatches,
        "offload_policy": None if offload is None else offload.policy,
        "bitwise_identical_to_baseline": None if baseline is None or with_offload is None
        else not mismatches,
        "mismatches": mismatches[:20],
    }
    if with_offload is not None:
        last = [r["offload_stats"][-1] for r in ranks]
        result["peak_activation_bytes"] = [s["peak_resident_bytes"] for s in last]
        result["offloaded_bytes"] = [s["offloaded_bytes"] for s in last]
        result["host_pool_bytes"] = [s["host_pool_bytes"] for s in last]
        result["executed_ops"] = [s["executed_ops"] for s in last]
        plans = ranks[0].get("offload_plan") or []
        if plans:
            result["auto_plan"] = plans[0]["log"]
    if baseline is not None and "offload_stats" in baseline[0]:
        last = [r["offload_stats"][-1] for r in _by_pp_rank(baseline)]
        result["baseline_peak_activation_bytes"] = [s["peak_resident_bytes"] for s in last]
        result["baseline_rank_order"] = [s["rank_order"] for s in last]
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def render_report(case, result, offload) -> str:
    lines = [
        f"megatron-offload train: GPT {case.num_layers} layers, hidden {case.hidden_size}, "
        f"seq {case.seq_length}, micro-batch {case.micro_batch_size} | PP={case.pp} "
        f"VPP={case.vpp or 1}, {case.microbatches} microbatches per rank | gloo on CPU",
    ]
    picture = schedule_picture(case, offload, result.get("executed_ops"))
    if picture:
        lines += ["", picture]
    if result.get("auto_plan"):
        lines += ["", *result["auto_plan"]]
    lines += ["", "iteration  loss        grad norm   time/iter"]
    for i, (loss, norm, t) in enumerate(
        zip(result["losses"], result["grad_norms"], result["iteration_time_s"])
    ):
        lines.append(f"{i:>9}  {loss:.6f}  {norm:10.6f}  {t:7.3f} s")
    if "peak_activation_bytes" in result and "baseline_peak_activation_bytes" in result:
        lines += [
            "",
            f"per-rank activation memory (measured, last iteration; policy {offload.policy}):",
            "pp rank | peak without offload | peak with offload | reduction | offloaded/iter | host pool",
        ]
        for rank, (before, after, moved, pool) in enumerate(
            zip(
                result["baseline_peak_activation_bytes"],
                result["peak_activation_bytes"],
                result["offloaded_bytes"],
                result["host_pool_bytes"],
            )
        ):
            cut = 100.0 * (1 - after / before) if before else 0.0
            lines.append(
                f"{rank:>7} | {_mib(before)} MiB         | {_mib(after)} MiB      | {cut:7.1f}% "
                f"| {_mib(moved)} MiB   | {_mib(pool)} MiB"
            )
    identical = result["bitwise_identical_to_baseline"]
    if identical is not None:
        lines.append("")
        lines.append(
            "losses and every gradient bitwise identical to the run without offload: "
            + ("yes" if identical else "NO\n  " + "\n  ".join(result["mismatches"]))
        )
    return "\n".join(lines)


def schedule_picture(case, offload: OffloadConfig | None, executed_ops=None) -> str:
    """The schedule this run executes, from the schedule IR: Megatron's order per rank with the
    offloads and reloads the runtime issues (``policy.runtime_schedule``; for policy auto, whose
    units the planner chose at run time, the ops each rank issued), simulated with
    backward = 2 x forward and a host link at k = 0.5."""
    from megatron_offload.policy import runtime_schedule
    from megatron_offload.schedule.costs import CostModel
    from megatron_offload.schedule.megatron import megatron_schedule
    from megatron_offload.schedule.render import render_ascii
    from megatron_offload.schedule.simulate import simulate

    kind = "interleaved" if case.vpp else "1f1b"
    schedule = megatron_schedule(kind, case.pp, case.vpp or 1, case.microbatches)
    if offload is not None and offload.policy == "auto":
        if not executed_ops:
            return ""
        from megatron_offload.schedule.ir import Op, Schedule

        ranks = tuple(tuple(Op.parse(t) for t in ops) for ops in executed_ops)
        schedule = Schedule(ranks, schedule.vpp, schedule.microbatches, schedule.kind, schedule.group_size)
    elif offload is not None:
        schedule = runtime_schedule(schedule, offload)
    timeline = simulate(schedule, CostModel(forward_time=1.0, backward_time=2.0, offload_ratio=0.5))
    title = "schedule (Megatron's order as run" + (
        f", offload policy {offload.policy}" if offload else ", no offload"
    ) + "; simulated times, f=1 b=2 k=0.5):"
    return title + "\n" + render_ascii(timeline, width=96)
