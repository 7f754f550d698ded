"""Time generate + offload pass + simulate for a large pipeline (default p=64, v=8, m=512).

    python benchmarks/schedule_speed.py [--pp 64 --vpp 8 --microbatches 512 --ratio 0.5] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time

from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.costs import CostModel
from megatron_offload.schedule.offload import plan_offload
from megatron_offload.schedule.simulate import simulate


def measure(kind: str, pp: int, vpp: int, m: int, ratio: float) -> dict:
    costs = CostModel(forward_time=1.0, backward_time=2.0, offload_ratio=ratio)
    t0 = time.perf_counter()
    schedule = make_schedule(kind, pp, vpp, m, pp)
    t1 = time.perf_counter()
    plan = plan_offload(schedule, costs)
    t2 = time.perf_counter()
    result = simulate(plan.schedule, costs, no_offload_makespan=plan.baseline.makespan)
    t3 = time.perf_counter()
    return {
        "schedule": kind, "pp": pp, "vpp": vpp, "microbatches": m, "offload_ratio": ratio,
        "ops": sum(len(ops) for ops in plan.schedule.ranks),
        "generate_s": t1 - t0, "offload_pass_s": t2 - t1, "simulate_s": t3 - t2, "total_s": t3 - t0,
        "peak_units_max": max(result.peak_units), "no_offload_peak_max": max(plan.baseline.peak_units),
        "offloaded_units_fraction": result.offloaded_fraction, "slowdown_vs_no_offload": result.slowdown,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=64)
    parser.add_argument("--vpp", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=512)
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.5])
    parser.add_argument("--schedule", nargs="+", default=["gis"], choices=["interleaved", "gis"])
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = [measure(kind, args.pp, args.vpp, args.microbatches, k) for kind in args.schedule for k in args.ratio]
    header = f"{'schedule':<12}{'p':>4}{'v':>3}{'m':>5}{'k':>5}{'ops':>9}{'gen s':>8}{'pass s':>8}{'sim s':>8}{'total s':>9}{'peak':>6}{'(none)':>7}{'offl':>7}"
    print(header)
    for r in rows:
        print(f"{r['schedule']:<12}{r['pp']:>4}{r['vpp']:>3}{r['microbatches']:>5}{r['offload_ratio']:>5g}{r['ops']:>9}"
              f"{r['generate_s']:>8.2f}{r['offload_pass_s']:>8.2f}{r['simulate_s']:>8.2f}{r['total_s']:>9.2f}"
              f"{r['peak_units_max']:>6}{r['no_offload_peak_max']:>7}{r['offloaded_units_fraction']:>7.1%}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
