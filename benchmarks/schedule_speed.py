"""Time generate + offload pass (full offload) + simulate for a large pipeline.

Acceptance: p=64, v=8, m=512 in under 2 s on a 2-core machine, for k in {0.5, 1.0, 1.5} and
gis with g = p and g = ceil(p/2) and Megatron's interleaved order (target <= 1.5 s).

    python benchmarks/schedule_speed.py [--pp 64 --vpp 8 --microbatches 512]
        [--ratio 0.5 1.0 1.5] [--schedule gis gis-half interleaved] [--repeat 3] [--json FILE]

Each cell is timed ``--repeat`` times and the fastest run is reported (wall clock; CPU time of
that run alongside, which a busy machine disturbs less). ``gis-half`` is gis with g = ceil(p/2).
"""
from __future__ import annotations

import argparse
import json
import math
import time

from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.costs import CostModel
from megatron_offload.schedule.offload import plan_offload
from megatron_offload.schedule.simulate import simulate

SCHEDULES = ("gis", "gis-half", "interleaved")
RATIOS = (0.5, 1.0, 1.5)


def group_size(name: str, pp: int) -> int:
    return math.ceil(pp / 2) if name == "gis-half" else pp


def measure_once(name: str, pp: int, vpp: int, m: int, ratio: float) -> dict:
    kind = "gis" if name.startswith("gis") else name
    g = group_size(name, pp)
    costs = CostModel(forward_time=1.0, backward_time=2.0, offload_ratio=ratio)
    c0, t0 = time.process_time(), time.perf_counter()
    schedule = make_schedule(kind, pp, vpp, m, g)
    t1 = time.perf_counter()
    plan = plan_offload(schedule, costs)
    t2 = time.perf_counter()
    result = simulate(plan.schedule, costs, no_offload_makespan=plan.baseline.makespan)
    t3, c3 = time.perf_counter(), time.process_time()
    return {
        "schedule": name, "kind": kind, "group_size": g, "pp": pp, "vpp": vpp, "microbatches": m,
        "offload_ratio": ratio, "ops": sum(len(ops) for ops in plan.schedule.ranks),
        "generate_s": t1 - t0, "offload_pass_s": t2 - t1, "simulate_s": t3 - t2, "total_s": t3 - t0,
        "cpu_s": c3 - c0,
        "makespan": result.makespan, "no_offload_makespan": plan.baseline.makespan,
        "peak_units_max": max(result.peak_units),
        "no_offload_peak_max": max(plan.baseline.peak_units),
        "offloaded_units_fraction": result.offloaded_fraction,
        "slowdown_vs_no_offload": result.slowdown,
    }


def measure(name: str, pp: int, vpp: int, m: int, ratio: float, repeat: int = 1) -> dict:
    runs = [measure_once(name, pp, vpp, m, ratio) for _ in range(max(1, repeat))]
    best = min(runs, key=lambda row: row["total_s"])
    best["repeat"] = len(runs)
    return best


def run(pp: int, vpp: int, m: int, schedules=SCHEDULES, ratios=RATIOS,
        repeat: int = 1) -> list[dict]:
    return [measure(name, pp, vpp, m, k, repeat) for name in schedules for k in ratios]


def table(rows: list[dict]) -> str:
    lines = [f"{'schedule':<12}{'g':>4}{'p':>4}{'v':>3}{'m':>5}{'k':>5}{'ops':>9}"
             f"{'gen s':>8}{'pass s':>8}{'sim s':>8}{'total s':>9}{'cpu s':>8}{'peak':>6}"
             f"{'(none)':>7}{'offl':>7}"]
    for r in rows:
        lines.append(
            f"{r['schedule']:<12}{r['group_size']:>4}{r['pp']:>4}{r['vpp']:>3}"
            f"{r['microbatches']:>5}{r['offload_ratio']:>5g}{r['ops']:>9}{r['generate_s']:>8.2f}"
            f"{r['offload_pass_s']:>8.2f}{r['simulate_s']:>8.2f}{r['total_s']:>9.2f}"
            f"{r['cpu_s']:>8.2f}{r['peak_units_max']:>6}{r['no_offload_peak_max']:>7}"
            f"{r['offloaded_units_fraction']:>7.1%}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=64)
    parser.add_argument("--vpp", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=512)
    parser.add_argument("--ratio", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--schedule", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per cell; the fastest is reported (default 3)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(args.pp, args.vpp, args.microbatches, args.schedule, args.ratio, args.repeat)
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
