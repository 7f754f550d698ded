"""``megatron-offload simulate``: generate a schedule, optionally offload, simulate, show it.

``--granularity layer`` refines it into per-layer entries (layer streaming) and simulates bytes.

Pure Python (no torch). Prints a summary and an ASCII timeline, or JSON with --json; writes a
picture with --out FILE.svg|FILE.png. Bad input stops with one argparse error naming the flag.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

NAME = "simulate"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from megatron_offload.schedule.catalog import SCHEDULE_KINDS

    parser = subparsers.add_parser(NAME,
                                   help="simulate a pipeline schedule with or without offload",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, required=True, help="pipeline-parallel ranks p")
    parser.add_argument("--vpp", type=int, default=1, help="model chunks per rank v (default 1)")
    parser.add_argument("--microbatches", type=int, required=True,
                        help="microbatches m per iteration")
    parser.add_argument("--schedule", choices=SCHEDULE_KINDS, required=True,
                        help="1f1b and interleaved: Megatron-Core's orders; "
                             "gis: generalized interleaving")
    parser.add_argument("--group-size", type=int, default=None,
                        help="microbatch group size g (interleaved: p..m, default p; "
                             "gis: 1..m, default min(p, m))")
    parser.add_argument("--offload-chunks", type=int, default=None,
                        help="offload units of model chunks 0..K-1 (default: all v chunks when "
                             "--offload-ratio is given; 0 = none)")
    parser.add_argument("--offload-ratio", type=float, default=None,
                        help="k = (D2H + H2D time of a unit) / (F + B time of a unit); "
                             "enables offload (default 1.0 when --offload-chunks is given)")
    parser.add_argument("--shared-link", action="store_true",
                        help="ranks 2i and 2i+1 share one host link")
    parser.add_argument("--forward-time", type=float, default=1.0,
                        help="forward time of one unit (default 1)")
    parser.add_argument("--backward-time", type=float, default=2.0,
                        help="backward time of one unit (default 2)")
    parser.add_argument("--p2p-latency", type=float, default=0.0,
                        help="time for an op's output to reach the next rank (default 0)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--out", default=None,
                        help="write a timeline picture: FILE.svg or FILE.png (needs matplotlib)")
    parser.add_argument("--width", type=int, default=100,
                        help="ASCII timeline width in columns (default 100)")
    parser.add_argument("--save-schedule", default=None,
                        help="write the schedule (with offload ops) in the text form")
    layer = parser.add_argument_group("layer granularity (layer streaming)", textwrap.fill(
        "--granularity layer refines every unit into its transformer layers: "
        "a layer's activations leave while the next layer computes and come back layer by layer; "
        "units with a lifespan also send the rest (embedding, loss, received input) out. Bytes "
        "are per layer of one microbatch; times per layer are --forward-time and --backward-time "
        "divided by --layers-per-chunk; the host link follows from --offload-ratio (0: "
        "synchronous copies, as on the CPU backend).", width=88))
    layer.add_argument("--granularity", choices=("unit", "layer"), default="unit",
                       help="unit: whole (chunk, microbatch) units move (default); "
                            "layer: per-layer sub-units, simulated in bytes")
    layer.add_argument("--layers-per-chunk", type=int, default=None,
                       help="transformer layers per model chunk on each rank (needed with "
                            "--granularity layer)")
    layer.add_argument("--layer-bytes", type=float, default=float(2**20),
                       help="bytes one layer's saved activations keep for one microbatch "
                            "(default 1 MiB)")
    layer.add_argument("--rest-bytes", type=float, default=0.0,
                       help="bytes the rest of a unit keeps: embedding, output layer, loss, "
                            "received input (default 0)")
    layer.add_argument("--reload-distance", default="auto",
                       help="compute entries between a reload and its first use: N, or auto = as "
                            "late as the link allows, skipping the copies it cannot hide (default)")
    parser.set_defaults(_parser=parser)
    return parser


def _check(args) -> tuple:
    """Validate everything before any work; returns (group size, costs, offload chunks)."""
    from megatron_offload.schedule.catalog import check_schedule_args
    from megatron_offload.schedule.costs import CostModel

    group = check_schedule_args(args.schedule, args.pp, args.vpp, args.microbatches,
                                args.group_size)
    chunks = args.offload_chunks
    if chunks is None and args.offload_ratio is not None:
        chunks = args.vpp
    if chunks is not None and not 0 <= chunks <= args.vpp:
        raise ValueError(f"--offload-chunks {chunks} must lie in 0..--vpp ({args.vpp}); "
                         f"e.g. --offload-chunks {args.vpp} offloads every chunk")
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
    if args.granularity == "layer":
        if args.layers_per_chunk is None or args.layers_per_chunk < 1:
            raise ValueError("--granularity layer needs --layers-per-chunk N >= 1 (got "
                             f"{args.layers_per_chunk})")
        if not args.layer_bytes >= 0 or not args.rest_bytes >= 0:
            raise ValueError(f"--layer-bytes {args.layer_bytes:g} and --rest-bytes "
                             f"{args.rest_bytes:g} must be >= 0")
        if args.layer_bytes == 0 and args.rest_bytes == 0:
            raise ValueError("--layer-bytes and --rest-bytes are both 0: nothing to simulate")
        if args.reload_distance != "auto" and not (args.reload_distance.isdigit()):
            raise ValueError(f"--reload-distance {args.reload_distance!r} must be "
                             "auto or an integer >= 0")
    elif args.layers_per_chunk is not None:
        raise ValueError("--layers-per-chunk only applies with --granularity layer")
    return group, costs, chunks


def run(args) -> int:
    from megatron_offload.schedule.catalog import make_schedule
    from megatron_offload.schedule.offload import plan_offload
    from megatron_offload.schedule.simulate import simulate

    try:
        group, costs, chunks = _check(args)
    except ValueError as error:
        args._parser.error(str(error))  # exits with status 2 and the usage line
    schedule = make_schedule(args.schedule, args.pp, args.vpp, args.microbatches, args.group_size)
    if args.granularity == "layer":
        return _run_layers(args, schedule, group, costs, chunks)
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
        from megatron_offload.schedule.render import render_figure

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
        from megatron_offload.schedule.render import render_ascii

        print(render_ascii(result, width=args.width))
        if chunks:
            print(f"offloaded {result.offloaded_fraction:.1%} of units "
                  f"(k={costs.offload_ratio:g}); slowdown vs no offload {result.slowdown:.1%}; "
                  f"no-offload peaks {baseline.peak_units}")
        if args.out:
            print(f"wrote {args.out}")
    return 0


def _run_layers(args, schedule, group, costs, chunks) -> int:
    """--granularity layer: expand, place reloads, simulate in bytes, report."""
    from megatron_offload.schedule.layer_sim import plan_layer_streaming
    from megatron_offload.schedule.layers import LayerProfile, LinkModel
    from megatron_offload.schedule.render_layers import format_bytes

    layers = args.layers_per_chunk
    vpp = schedule.vpp
    profile = LayerProfile.uniform(
        vpp, layers, args.layer_bytes, args.rest_bytes,
        forward_time=args.forward_time / layers, backward_time=args.backward_time / layers,
    )
    unit_bytes = profile.unit_bytes(0)
    link = None
    if chunks and costs.offload_ratio > 0:
        # k = (D2H + H2D of a unit) / (F + B of a unit), split evenly between the directions
        bandwidth = unit_bytes / (costs.offload_ratio * (args.forward_time + args.backward_time)
                                  * costs.offload_share)
        link = LinkModel(d2h_bytes_per_time=bandwidth, shared=args.shared_link)
    distance = args.reload_distance if args.reload_distance == "auto" else int(args.reload_distance)
    plan = plan_layer_streaming(schedule, layers, profile, link, chunks=chunks or 0,
                                reload_distance=distance, p2p_latency=args.p2p_latency)
    expanded, result, plain = plan.expanded, plan.simulation, plan.baseline
    if args.save_schedule:
        with open(args.save_schedule, "w", encoding="utf-8") as handle:
            handle.write(expanded.to_text())
    if args.out:
        from megatron_offload.schedule.render_layers import render_layer_figure

        render_layer_figure(result, args.out)
    makespan = result.makespan
    busy = sum(r.busy for r in result.ranks)
    total_bytes = schedule.pp * schedule.units_per_rank * unit_bytes
    equivalents = [peak / unit_bytes if unit_bytes else 0.0 for peak in result.peak_bytes]
    report = {
        "schedule": args.schedule,
        "pp": args.pp,
        "vpp": args.vpp,
        "microbatches": args.microbatches,
        "group_size": group,
        "makespan": makespan,
        "bubble_ratio": 1.0 - busy / (schedule.pp * makespan) if makespan else 0.0,
        "peak_units": equivalents,
        "offloaded_units_fraction": (sum(r.offloaded_bytes for r in result.ranks) / total_bytes
                                     if total_bytes else 0.0),
        "slowdown_vs_no_offload": makespan / plain.makespan - 1.0 if plain.makespan else 0.0,
        "granularity": "layer",
        "layers_per_chunk": layers,
        "layer_bytes": args.layer_bytes,
        "rest_bytes": args.rest_bytes,
        "peak_bytes": result.peak_bytes,
        "peak_bytes_without_offload": plain.peak_bytes,
        "peak_units_equivalent": equivalents,
        "copies": result.copies,
        "offloaded_bytes": [r.offloaded_bytes for r in result.ranks],
        "stall": result.stall,
        "reload_distance": args.reload_distance,
        "synchronous_copies": link is None,
    }
    if args.json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
        return 0
    from megatron_offload.schedule.render_layers import render_layers_ascii

    print(f"{schedule.kind} p={schedule.pp} v={vpp} m={schedule.microbatches}, {layers} layers per "
          f"chunk, layer {format_bytes(args.layer_bytes)}, rest {format_bytes(args.rest_bytes)}, "
          f"unit {format_bytes(unit_bytes)}; "
          + ("synchronous copies" if link is None
             else f"link {format_bytes(link.d2h_bytes_per_time)} per time unit "
                  f"(k={costs.offload_ratio:g})"))
    print(render_layers_ascii(result, width=args.width))
    print("rank | peak bytes           | units-equiv | without offload      | copies | stall")
    for r, sim in enumerate(result.ranks):
        print(f"{r:>4} | {format_bytes(sim.peak_bytes):>20} | {equivalents[r]:>11.2f} | "
              f"{format_bytes(plain.peak_bytes[r]):>20} | {sim.copies:>6} | {sim.stall:g}")
    print(f"makespan {makespan:g} (without offload {plain.makespan:g}, "
          f"slowdown {report['slowdown_vs_no_offload']:.1%}); moved "
          f"{report['offloaded_units_fraction']:.1%} of activation bytes")
    if args.out:
        print(f"wrote {args.out}")
    return 0
