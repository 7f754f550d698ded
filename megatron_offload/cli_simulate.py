"""``megatron-offload simulate``: generate a schedule, optionally offload, simulate, show it.

Pure Python (no torch). Prints a summary and an ASCII timeline, or JSON with --json; writes a
picture with --out FILE.svg|FILE.png. Bad input stops with one argparse error naming the flag.
"""
from __future__ import annotations

import argparse
import json
import sys

NAME = "simulate"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .schedule.catalog import SCHEDULE_KINDS

    parser = subparsers.add_parser(NAME, help="simulate a pipeline schedule with or without offload",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, required=True, help="pipeline-parallel ranks p")
    parser.add_argument("--vpp", type=int, default=1, help="model chunks per rank v (default 1)")
    parser.add_argument("--microbatches", type=int, required=True, help="microbatches m per iteration")
    parser.add_argument("--schedule", choices=SCHEDULE_KINDS, required=True,
                        help="1f1b and interleaved: Megatron-Core's orders; gis: generalized interleaving")
    parser.add_argument("--group-size", type=int, default=None,
                        help="microbatch group size g (interleaved: p..m, default p; gis: 1..m, default min(p, m))")
    parser.add_argument("--offload-chunks", type=int, default=None,
                        help="offload units of model chunks 0..K-1 (default: all v chunks when --offload-ratio is given; 0 = none)")
    parser.add_argument("--offload-ratio", type=float, default=None,
                        help="k = (D2H + H2D time of a unit) / (F + B time of a unit); enables offload (default 1.0 when --offload-chunks is given)")
    parser.add_argument("--shared-link", action="store_true", help="ranks 2i and 2i+1 share one host link")
    parser.add_argument("--forward-time", type=float, default=1.0, help="forward time of one unit (default 1)")
    parser.add_argument("--backward-time", type=float, default=2.0, help="backward time of one unit (default 2)")
    parser.add_argument("--p2p-latency", type=float, default=0.0, help="time for an op's output to reach the next rank (default 0)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--out", default=None, help="write a timeline picture: FILE.svg or FILE.png (needs matplotlib)")
    parser.add_argument("--width", type=int, default=100, help="ASCII timeline width in columns (default 100)")
    parser.add_argument("--save-schedule", default=None, help="write the schedule (with offload ops) in the text form")
    parser.set_defaults(_parser=parser)
    return parser


def _check(args) -> tuple:
    """Validate everything before any work; returns (group size, costs, offload chunks)."""
    from .schedule.catalog import check_schedule_args
    from .schedule.costs import CostModel

    group = check_schedule_args(args.schedule, args.pp, args.vpp, args.microbatches, args.group_size)
    chunks = args.offload_chunks
    if chunks is None and args.offload_ratio is not None:
        chunks = args.vpp
    if chunks is not None and not 0 <= chunks <= args.vpp:
        raise ValueError(f"--offload-chunks {chunks} must lie in 0..--vpp ({args.vpp}); e.g. --offload-chunks {args.vpp} offloads every chunk")
    costs = CostModel(
        forward_time=args.forward_time,
        backward_time=args.backward_time,
        p2p_latency=args.p2p_latency,
        offload_ratio=1.0 if args.offload_ratio is None else args.offload_ratio,
        shared_link=args.shared_link,
    )
    if args.out is not None and not args.out.lower().endswith((".svg", ".png")):
        raise ValueError(f"--out {args.out!r} must end in .svg or .png")
    if args.width < 10:
        raise ValueError(f"--width {args.width} must be >= 10")
    return group, costs, chunks


def run(args) -> int:
    from .schedule.catalog import make_schedule
    from .schedule.offload import plan_offload
    from .schedule.simulate import simulate

    try:
        group, costs, chunks = _check(args)
    except ValueError as error:
        args._parser.error(str(error))  # exits with status 2 and the usage line
    schedule = make_schedule(args.schedule, args.pp, args.vpp, args.microbatches, args.group_size)
    baseline = simulate(schedule, costs)
    if chunks:
        plan = plan_offload(schedule, costs, chunks=chunks, baseline=baseline)
        schedule = plan.schedule
        result = simulate(schedule, costs, no_offload_makespan=baseline.makespan)
    else:
        result = baseline
    if args.save_schedule:
        schedule.save(args.save_schedule)
    if args.out:
        from .schedule.render import render_figure

        render_figure(result, args.out)
    report = {
        "schedule": args.schedule,
        "pp": args.pp,
        "vpp": args.vpp,
        "microbatches": args.microbatches,
        "group_size": group,
        "makespan": result.makespan,
        "bubble_ratio": result.bubble_ratio,
        "peak_units": result.peak_units,
        "offloaded_units_fraction": result.offloaded_fraction,
        "slowdown_vs_no_offload": result.slowdown,
    }
    if args.json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
    else:
        from .schedule.render import render_ascii

        print(render_ascii(result, width=args.width))
        if chunks:
            print(f"offloaded {result.offloaded_fraction:.1%} of units (k={costs.offload_ratio:g}); "
                  f"slowdown vs no offload {result.slowdown:.1%}; no-offload peaks {baseline.peak_units}")
        if args.out:
            print(f"wrote {args.out}")
    return 0
