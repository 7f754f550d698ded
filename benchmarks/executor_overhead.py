"""Iteration time: Megatron's interleaved function vs the executor running the same order.

PP=4 VPP=2 on four gloo ranks (CPU), one tiny GPT per rank, no offload (policy none, no
memory measurement). Variants, interleaved in every round inside the same worker processes
(``testing.executor_cases.run_variants``, weights restored before each):

- ``megatron``: unpatched ``forward_backward_pipelining_with_interleaving``;
- ``executor (megatron order)``: ``--offload-schedule gis`` with the executor told to run
  Megatron's own interleaved order (``integration.gis_schedule.settings.order``);
- ``executor (gis g=p)``: the executor running generalized interleaving, g = p.

Each iteration's time is the slowest rank's; the first iteration of every run is dropped;
medians over all rounds. Target: the executor on Megatron's order within 5% of Megatron's
function. Every executor run is also compared bitwise (loss, grads, weights) with Megatron's.

    python benchmarks/executor_overhead.py [--rounds 3] [--iters 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the variants")
    parser.add_argument("--iters", type=int, default=6, help="iterations per run (first dropped)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    from megatron_offload.config import OffloadConfig
    from megatron_offload.testing.gpt import TinyGPTCase
    from megatron_offload.testing.pool import WorkerPool

    case = TinyGPTCase(pp=4, vpp=2, microbatches=args.microbatches, hidden_size=args.hidden_size,
                       seq_length=args.seq_length)
    executor = OffloadConfig(schedule="gis", policy="none", granularity="unit")
    named = {
        "megatron": {"offload": None},
        "executor (megatron order)": {"offload": executor, "order": "megatron"},
        "executor (gis g=p)": {"offload": executor, "order": "gis"},
    }
    names = list(named)
    times: dict[str, list[float]] = {name: [] for name in names}
    mismatches: dict[str, int] = {name: 0 for name in names}
    started = time.perf_counter()
    with WorkerPool(4) as pool:
        for round_index in range(args.rounds):
            order = names[1:] if round_index % 2 == 0 else names[:0:-1]
            sequence = ["megatron", *order, "megatron", *reversed(order)]
            ranks = pool.run("megatron_offload.testing.executor_cases:run_variants", case=case,
                             variants=[named[n] for n in sequence], iterations=args.iters,
                             timeout=600)
            for index, name in enumerate(sequence):
                per_iteration = zip(*(rank[index]["step_s"] for rank in ranks))
                times[name] += [max(step) for step in list(per_iteration)[1:]]
                mismatches[name] += sum(len(rank[index]["mismatches"]) for rank in ranks)
            print(f"[executor_overhead] round {round_index + 1}/{args.rounds} done",
                  file=sys.stderr)

    base = statistics.median(times["megatron"])
    rows = [{
        "variant": name,
        "median_iteration_s": statistics.median(samples),
        "ratio_to_megatron": statistics.median(samples) / base,
        "samples": len(samples),
        "bitwise_identical_to_megatron": mismatches[name] == 0,
    } for name, samples in times.items()]
    print(f"PP=4 VPP=2, {case.microbatches} microbatches, hidden {case.hidden_size}, seq "
          f"{case.seq_length}, {args.rounds} rounds x 2 runs x {args.iters - 1} timed iterations, "
          f"gloo on CPU ({time.perf_counter() - started:.0f} s)")
    print(f"{'variant':<27} {'median s/iter':>13} {'vs megatron':>11} {'bitwise':>8}")
    for row in rows:
        print(f"{row['variant']:<27} {row['median_iteration_s']:>13.4f} "
              f"{row['ratio_to_megatron']:>11.3f} "
              f"{'yes' if row['bitwise_identical_to_megatron'] else 'NO':>8}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"case": case.as_dict(), "rounds": args.rounds, "iters": args.iters,
                       "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
