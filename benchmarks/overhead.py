"""Iteration time: unpatched Megatron vs the plugin with policy `none` vs `full` (CPU backend).

PP=4 VPP=2 on four gloo ranks. The three variants run in interleaved rounds inside the same
worker processes, so machine noise hits all of them alike; each iteration's time is the
slowest rank's, the first iteration of every run is dropped (warm-up), and ratios are medians
over all rounds of one invocation. Target: policy `none` within 3% of unpatched.

    python benchmarks/overhead.py [--rounds 4] [--iters 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the three variants")
    parser.add_argument("--iters", type=int, default=6, help="iterations per run (first dropped)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    from megatron_offload.config import OffloadConfig
    from megatron_offload.testing.gpt import TinyGPTCase
    from megatron_offload.testing.pool import WorkerPool

    case = TinyGPTCase(
        pp=4, vpp=2, microbatches=args.microbatches, hidden_size=args.hidden_size,
        seq_length=args.seq_length,
    )
    variants = {
        "unpatched": None,
        "plugin none": OffloadConfig(policy="none"),
        "plugin full": OffloadConfig(policy="full", min_offload_bytes=0, backend="cpu"),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    moved: dict[str, int] = {}
    started = time.perf_counter()
    with WorkerPool(4) as pool:
        for round_index in range(args.rounds):
            order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
            for name in order:
                ranks = pool.run(
                    "megatron_offload.testing.reference:run_case",
                    case=case, iterations=args.iters, offload_config=variants[name],
                )
                per_iteration = zip(*(r["timing"]["step_s"] for r in ranks))
                times[name] += [max(step) for step in list(per_iteration)[1:]]
                if variants[name] is not None:
                    moved[name] = max(r["offload_stats"][-1]["offloaded_bytes"] for r in ranks)
            print(f"[overhead] round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    base = statistics.median(times["unpatched"])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append({
            "variant": name,
            "median_iteration_s": median,
            "ratio_to_unpatched": median / base,
            "samples": len(samples),
            "offloaded_bytes_per_iteration_max_rank": moved.get(name, 0),
        })
    print(f"PP=4 VPP=2, {case.microbatches} microbatches, hidden {case.hidden_size}, seq "
          f"{case.seq_length}, {args.rounds} rounds x {args.iters - 1} timed iterations, "
          f"gloo on CPU ({time.perf_counter() - started:.0f} s)")
    print(f"{'variant':<14} {'median s/iter':>13} {'vs unpatched':>12} {'offloaded/iter':>15}")
    for row in rows:
        print(f"{row['variant']:<14} {row['median_iteration_s']:>13.4f} "
              f"{row['ratio_to_unpatched']:>12.3f} "
              f"{row['offloaded_bytes_per_iteration_max_rank'] / 2**20:>11.1f} MiB")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"case": case.as_dict(), "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
