"""Time ``plan_job`` for 70B- and 175B-like Megatron jobs (acceptance: under 1 s per plan).

    python benchmarks/plan_speed.py [--repeat 3] [--gpu h100-80g h200] [--json FILE]

Jobs: a Llama-3-70B-like job (80 layers, h 8192, ffn 28672, 64 heads / 8 groups, seq 8192,
SwiGLU, RMSNorm, RoPE, bf16; TP 4 + SP, PP 8 x 5 chunks, DP 2, 64 microbatches) and a
GPT-175B-like job (96 layers, h 12288, 96 heads, seq 2048, bf16; TP 8 + SP, PP 16 x 3 chunks,
DP 8, 192 microbatches), each with the GPU's default budget, a tight budget (offload needed) and
a budget below every plan's floor (does not fit: the remedy search re-plans the job several
times, so that row is the slowest). Each cell is the fastest of ``--repeat`` runs, wall clock
and CPU time of that run (CPU time is what a busy shared machine disturbs less). Columns: the
plan's granularity (``gran``: unit or layer), its worst rank (GiB, at that granularity), the
same plan at unit granularity, the job as given, and ``lay``: layer-streaming simulations run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_offload.planning.costmodel import GiB  # noqa: E402
from megatron_offload.planning.hardware import preset  # noqa: E402
from megatron_offload.planning.job import JobSpec  # noqa: E402
from megatron_offload.planning.search import plan_job  # noqa: E402

JOBS = {
    "llama3-70b": JobSpec(
        num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
        num_query_groups=8, seq_length=8192, swiglu=True, normalization="RMSNorm",
        add_bias_linear=False, position_embedding_type="rope",
        untie_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0,
        dtype="bf16", vocab_size=128256, micro_batch_size=1, global_batch_size=128,
        tensor_model_parallel_size=4, sequence_parallel=True, pipeline_model_parallel_size=8,
        virtual_stages=5, use_distributed_optimizer=True, data_parallel_size=2),
    "gpt-175b": JobSpec(
        num_layers=96, hidden_size=12288, num_attention_heads=96, seq_length=2048, dtype="bf16",
        vocab_size=50257, micro_batch_size=1, global_batch_size=1536,
        tensor_model_parallel_size=8, sequence_parallel=True, pipeline_model_parallel_size=16,
        virtual_stages=3, use_distributed_optimizer=True, data_parallel_size=8),
}
BUDGETS = {"llama3-70b": (None, 50.0, 20.0), "gpt-175b": (None, 18.0, 8.0)}


def measure(name: str, job: JobSpec, gpu: str, budget: float | None, repeat: int) -> dict:
    best = None
    for _ in range(max(1, repeat)):
        c0, t0 = time.process_time(), time.perf_counter()
        plan = plan_job(job, preset(gpu), memory_budget_gib=budget)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best["wall_s"]:
            chosen = plan.chosen or plan.baseline
            best = {
                "job": name, "gpu": gpu, "budget_gib": round(plan.budget_bytes / GiB, 2),
                "fits": plan.fits, "schedule": chosen.kind, "group_size": chosen.group_size,
                "offload_chunks": plan.offload_chunks,
                "recompute": chosen.setting.recompute.label, "k": round(chosen.setting.k, 3),
                "granularity": getattr(plan, "granularity", "unit"),
                "layer_scores": getattr(plan, "layer_scores", 0),
                "worst_gib": round(
                    max(getattr(plan, "memory_bytes", chosen.memory_bytes)) / GiB, 2),
                "worst_unit_gib": round(max(chosen.memory_bytes) / GiB, 2),
                "worst_gib_without": round(max(plan.baseline.memory_bytes) / GiB, 2),
                "slowdown": round(plan.slowdown, 4),
                "missing_gib": round(plan.missing_bytes / GiB, 2),
                "remedy": plan.remedy.change if plan.remedy else None, "candidates": plan.evaluated,
                "wall_s": wall, "cpu_s": cpu, "repeat": repeat,
            }
    return best


def table(rows: list[dict]) -> str:
    lines = [f"{'job':<11}{'gpu':<9}{'budget':>7}{'fits':>6} {'plan':<34}{'gran':>6}"
             f"{'k':>6}{'worst':>7}{'unit':>7}{'w/o':>7}{'slow':>7}{'cand':>5}{'lay':>4}"
             f"{'wall s':>8}{'cpu s':>7}"]
    for r in rows:
        g = f" g={r['group_size']}" if r["group_size"] and r["schedule"] != "1f1b" else ""
        plan = f"{r['schedule']}{g} K={r['offload_chunks']} rc={r['recompute']}"
        lines.append(f"{r['job']:<11}{r['gpu']:<9}{r['budget_gib']:>7.1f}{str(r['fits']):>6} "
                     f"{plan:<34}{r['granularity']:>6}{r['k']:>6.2f}{r['worst_gib']:>7.1f}"
                     f"{r['worst_unit_gib']:>7.1f}{r['worst_gib_without']:>7.1f}"
                     f"{r['slowdown']:>7.1%}{r['candidates']:>5}{r['layer_scores']:>4}"
                     f"{r['wall_s']:>8.3f}{r['cpu_s']:>7.3f}")
        if not r["fits"]:
            lines.append(f"{'':<26}does not fit: {r['missing_gib']} GiB missing; "
                         f"remedy: {r['remedy']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", nargs="+", default=["h100-80g", "h200"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = parser.parse_args(argv)
    rows = [measure(name, job, gpu, budget, args.repeat)
            for name, job in JOBS.items() for gpu in args.gpu for budget in BUDGETS[name]]
    print(table(rows))
    fitting = [r for r in rows if r["fits"]]
    slowest = max(fitting, key=lambda r: r["wall_s"]) if fitting else None
    if slowest:
        print(f"slowest fitting plan: {slowest['wall_s']:.3f} s wall, {slowest['cpu_s']:.3f} s CPU "
              f"({slowest['job']} on {slowest['gpu']})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
