"""``megatron-offload plan``: what fits, what to offload, with which schedule, at what cost.

Paste the Megatron-LM arguments of the job you run and name the GPU:

    megatron-offload plan --num-layers 80 --hidden-size 8192 ... --bf16 --gpu h100-80g

Megatron-LM flags the planner does not use are accepted and listed as ignored. Prints a table
per pipeline rank (activation memory without the plan and with it at unit and at layer
granularity, static and host memory), the predicted iteration time and slowdown, and the choice
with its reasons; ``--json`` prints one JSON object instead; ``--out FILE.svg|png`` draws the
planned schedule. Pure Python (no torch).

Granularity: the planner also scores layer streaming (--offload-granularity layer: each
transformer layer's activations move on their own) with the layer simulator, and picks it when
it lowers the worst rank's predicted memory, or makes the job (or a faster schedule) fit,
without adding more than 1% to the iteration time. The JSON key "granularity" is the choice;
"predicted_peak_activation_gib" and "predicted_peak_memory_gib" (per rank) are predicted at
that granularity, "predicted_peak_activation_gib_unit" / "..._layer" at each (layer: null when
not scored); the PLAN line's flags include --offload-granularity layer when chosen.

Exit status: 0 when the job fits, 1 when it does not, 2 for bad flags.
"""
from __future__ import annotations

import argparse
import json
import sys

NAME = "plan"

MEGATRON_FLAGS: dict[str, dict] = {
    # model
    "--num-layers": dict(type=int, required=True),
    "--hidden-size": dict(type=int, required=True),
    "--ffn-hidden-size": dict(type=int),
    "--num-attention-heads": dict(type=int, required=True),
    "--num-query-groups": dict(type=int),
    "--group-query-attention": dict(action="store_true"),
    "--kv-channels": dict(type=int),
    "--seq-length": dict(type=int, required=True),
    "--max-position-embeddings": dict(type=int),
    "--vocab-size": dict(type=int),
    "--make-vocab-size-divisible-by": dict(type=int, default=128),
    "--swiglu": dict(action="store_true"),
    "--normalization": dict(choices=("LayerNorm", "RMSNorm"), default="LayerNorm"),
    "--disable-bias-linear": dict(action="store_false", dest="add_bias_linear"),
    "--position-embedding-type": dict(choices=("learned_absolute", "rope", "none"),
                                      default="learned_absolute"),
    "--use-rotary-position-embeddings": dict(action="store_true"),
    "--untie-embeddings-and-output-weights": dict(action="store_true"),
    "--hidden-dropout": dict(type=float, default=0.1),
    "--attention-dropout": dict(type=float, default=0.1),
    "--attention-softmax-in-fp32": dict(action="store_true"),
    "--bf16": dict(action="store_true"),
    "--fp16": dict(action="store_true"),
    "--transformer-impl": dict(choices=("transformer_engine", "local"),
                               default="transformer_engine"),
    "--attention-backend": dict(choices=("auto", "flash", "fused", "unfused", "local"),
                                default="auto"),
    "--use-flash-attn": dict(action="store_true"),
    "--no-bias-gelu-fusion": dict(action="store_false", dest="bias_gelu_fusion"),
    "--no-bias-swiglu-fusion": dict(action="store_false", dest="bias_swiglu_fusion"),
    "--no-rope-fusion": dict(action="store_false", dest="apply_rope_fusion"),
    "--no-masked-softmax-fusion": dict(action="store_false", dest="masked_softmax_fusion"),
    # batch and parallelism
    "--micro-batch-size": dict(type=int, default=1),
    "--global-batch-size": dict(type=int),
    "--tensor-model-parallel-size": dict(type=int, default=1),
    "--pipeline-model-parallel-size": dict(type=int, default=1),
    "--num-layers-per-virtual-pipeline-stage": dict(type=int),
    "--num-virtual-stages-per-pipeline-rank": dict(type=int),
    "--microbatch-group-size-per-virtual-pipeline-stage": dict(
        type=int, dest="microbatch_group_size_per_vp_stage"),
    "--sequence-parallel": dict(action="store_true"),
    "--context-parallel-size": dict(type=int, default=1),
    # recomputation
    "--recompute-granularity": dict(choices=("full", "selective")),
    "--recompute-method": dict(choices=("uniform", "block")),
    "--recompute-num-layers": dict(type=int),
    "--recompute-modules": dict(nargs="*"),
    "--recompute-activations": dict(action="store_true"),
    "--distribute-saved-activations": dict(action="store_true"),
    # optimizer
    "--use-distributed-optimizer": dict(action="store_true"),
    "--accumulate-allreduce-grads-in-fp32": dict(action="store_true", default=None),
    "--optimizer": dict(choices=("adam", "sgd"), default="adam"),
}
"""Megatron-LM flags the planner reads, with Megatron-LM's dests and defaults."""

PLANNER_FLAGS = {
    "--gpu", "--gpu-memory-gib", "--gpu-tflops", "--host-link-gbps", "--host-memory-gib",
    "--gpus-per-node", "--memory-budget-gib", "--memory-reserve-gib", "--host-memory-fraction",
    "--world-size", "--data-parallel-size", "--padded-vocab-size", "--offload-schedule",
    "--no-recompute-fallback", "--offload-min-bytes", "--json", "--out",
    "--offload-memory-budget-gib", "--offload-memory-budget-scope", "--offload-memory-reserve-gib",
    "--offload-prefetch", "--offload-policy",
}

_WARN_IF_GIVEN = {
    "--num-experts": "MoE layers are not modelled: predictions assume dense MLPs",
    "--decoder-first-pipeline-num-layers": "uneven pipeline stages are not modelled: "
                                           "layers are spread evenly",
    "--decoder-last-pipeline-num-layers": "uneven pipeline stages are not modelled: "
                                          "layers are spread evenly",
    "--fp8-format": "FP8 activations are not modelled: bytes are those of the bf16/fp16 run",
    "--multi-latent-attention": "multi-latent attention is not modelled",
}


class _KeepUnknownParser(argparse.ArgumentParser):
    """A subparser that keeps the flags it does not know in ``args.ignored_flags`` instead of
    failing: pasted Megatron-LM command lines carry many flags the planner does not use."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.ignored_flags = (list(getattr(namespace, "ignored_flags", None) or [])
                                   + list(extras))
        return namespace, []


def add_parser(subparsers) -> argparse.ArgumentParser:
    from megatron_offload.planning.hardware import PRESETS

    parser = subparsers.add_parser(NAME,
                                   help="plan offload for a Megatron-LM job under a memory budget",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)
    parser.__class__ = _KeepUnknownParser
    megatron = parser.add_argument_group("Megatron-LM flags (as in the job's command line)")
    for flag, spec in MEGATRON_FLAGS.items():
        megatron.add_argument(flag, **spec)
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--gpu", choices=tuple(PRESETS),
                    help="GPU preset (see python -m megatron_offload.planning.hardware)")
    hw.add_argument("--gpu-memory-gib", type=float, help="GPU memory, GiB (overrides the preset)")
    hw.add_argument("--gpu-tflops", type=float,
                    help="compute rate the job achieves, dense bf16 TFLOP/s (overrides the preset)")
    hw.add_argument("--host-link-gbps", type=float,
                    help="host link per direction per GPU with all GPUs of the node copying, "
                         "GB/s (overrides the preset)")
    hw.add_argument("--host-memory-gib", type=float,
                    help="host RAM per node, GiB (default: the preset's, else this machine's)")
    hw.add_argument("--gpus-per-node", type=int,
                    help="GPUs (local ranks) per node (default: the preset's, 8)")
    budget = parser.add_argument_group("budget and search")
    budget.add_argument("--memory-budget-gib", type=float, dest="memory_budget_gib",
                        help="GPU memory the job may use, GiB (default: GPU memory minus "
                             "--memory-reserve-gib; with --offload-memory-budget-scope device: "
                             "--offload-memory-budget-gib)")
    budget.add_argument("--memory-reserve-gib", type=float,
                        help="GPU memory kept out of the budget (default 2 GiB + 5%%)")
    budget.add_argument("--host-memory-fraction", type=float, default=0.5,
                        help="share of host RAM offload may pin (default 0.5, "
                             "the runtime's default host budget)")
    budget.add_argument("--world-size", type=int,
                        help="GPUs in the job (data-parallel size = world / (TP x PP x CP))")
    budget.add_argument("--data-parallel-size", type=int,
                        help="data-parallel size (default from --world-size, else 1)")
    budget.add_argument("--padded-vocab-size", type=int,
                        help="vocabulary as padded by Megatron (default: --vocab-size padded)")
    budget.add_argument("--offload-schedule", choices=("auto", "megatron", "gis"), default="auto",
                        help="schedules to consider: megatron (Megatron's own orders), "
                             "gis (generalized interleaving), auto (both)")
    budget.add_argument("--no-recompute-fallback", action="store_true",
                        help="keep the job's recomputation (no recompute ladder)")
    budget.add_argument("--offload-min-bytes", type=int, default=64 * 1024,
                        help="the runtime's threshold (default 64 KiB)")
    auto = parser.add_argument_group(
        "policy auto (the runtime's flags: what --offload-policy auto will choose)")
    auto.add_argument("--offload-memory-budget-gib", type=float, dest="offload_memory_budget_gib",
                      help="the runtime's budget: resident activations per rank, GiB (default: "
                           "the largest value that keeps every rank within the GPU budget)")
    auto.add_argument("--offload-memory-budget-scope", choices=("activations", "device"),
                      default="activations",
                      help="what --offload-memory-budget-gib counts (device: the whole GPU; "
                           "static, working memory and --offload-memory-reserve-gib are "
                           "subtracted per rank)")
    auto.add_argument("--offload-memory-reserve-gib", type=float, default=2.0,
                      help="with --offload-memory-budget-scope device: GiB kept out of "
                           "the budget (default 2)")
    auto.add_argument("--offload-prefetch", type=int, default=1,
                      help="the runtime's reload distance in ops (default 1)")
    auto.add_argument("--offload-policy", choices=("auto", "none", "full", "chunks"),
                      help="accepted from a pasted job's flags; the report always shows "
                           "policy auto")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object; per-rank predictions are at the "
                          "plan's granularity (key granularity), both granularities in "
                          "predicted_peak_activation_gib_unit / _layer")
    out.add_argument("--out",
                     help="draw the planned schedule: FILE.svg or FILE.png (needs matplotlib)")
    parser.set_defaults(_parser=parser)
    return parser


def _ignored(tokens: list[str]) -> list[str]:
    """Unknown tokens as flags with their values: ['--lr 3e-4', '--use-mcore-models', ...]."""
    groups: list[str] = []
    for token in tokens:
        if token.startswith("-") and not _is_number(token) or not groups:
            groups.append(token)
        else:
            groups[-1] += " " + token
    return groups


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _job(args):
    from megatron_offload.planning.job import JobSpec

    per_stage = 1
    if args.data_parallel_size is not None and args.world_size is not None:
        raise ValueError("give --world-size or --data-parallel-size, not both")
    if args.world_size is not None:
        per_stage = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                     * args.context_parallel_size)
        if args.world_size % per_stage:
            raise ValueError(f"--world-size {args.world_size} must divide by "
                             f"TP x PP x CP = {per_stage}")
        args.data_parallel_size = args.world_size // per_stage
    if args.fp16 and args.bf16:
        raise ValueError("--fp16 and --bf16 exclude each other")
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if args.group_query_attention and args.num_query_groups is None:
        raise ValueError("--group-query-attention needs --num-query-groups")
    if args.num_query_groups is not None and not args.group_query_attention:
        # Megatron-LM ignores it too
        args.ignored_flags = list(getattr(args, "ignored_flags", []) or [])
        args.gqa_warning = True
    if args.use_flash_attn:
        args.attention_backend = "flash"
    overrides = {}
    if args.vocab_size is None and args.padded_vocab_size is None:
        overrides["vocab_size"] = 50257
    return JobSpec.from_megatron_args(args, **overrides)


def _check(args):
    from megatron_offload.planning.hardware import hardware_from_args

    if args.out is not None and not args.out.lower().endswith((".svg", ".png")):
        raise ValueError(f"--out {args.out!r} must end in .svg or .png")
    job = _job(args)
    hardware = hardware_from_args(args.gpu, gpu_memory_gib=args.gpu_memory_gib,
                                  gpu_tflops=args.gpu_tflops, host_link_gbps=args.host_link_gbps,
                                  host_memory_gib=args.host_memory_gib,
                                  gpus_per_node=args.gpus_per_node)
    families = ("megatron", "gis") if args.offload_schedule == "auto" else (args.offload_schedule,)
    return job, hardware, families


def run(args) -> int:
    from megatron_offload.planning.search import auto_for_plan, plan_job

    ignored = _ignored(getattr(args, "ignored_flags", []) or [])
    warnings = [f"{flag.split()[0]}: {_WARN_IF_GIVEN[flag.split()[0]]}"
                for flag in ignored if flag.split()[0] in _WARN_IF_GIVEN]
    try:
        job, hardware, families = _check(args)
        gpu_budget = args.memory_budget_gib
        if gpu_budget is None and args.offload_memory_budget_scope == "device":
            gpu_budget = args.offload_memory_budget_gib
        plan = plan_job(job, hardware, memory_budget_gib=gpu_budget,
                        reserve_gib=args.memory_reserve_gib, host_memory_gib=args.host_memory_gib,
                        host_memory_fraction=args.host_memory_fraction, families=families,
                        allow_recompute=not args.no_recompute_fallback,
                        min_offload_bytes=args.offload_min_bytes)
        auto = auto_for_plan(plan, memory_budget_gib=args.offload_memory_budget_gib,
                             scope=args.offload_memory_budget_scope,
                             reserve_gib=args.offload_memory_reserve_gib,
                             prefetch_distance=args.offload_prefetch,
                             min_offload_bytes=args.offload_min_bytes)
    except ValueError as error:
        args._parser.error(str(error))  # exits with status 2 and the usage line
    if getattr(args, "gqa_warning", False):
        warnings.append("--num-query-groups without --group-query-attention: Megatron-LM ignores "
                        "it (plain multi-head attention); add --group-query-attention")
    if args.vocab_size is None and args.padded_vocab_size is None:
        warnings.append("--vocab-size not given: assumed 50257 (GPT-2); give the tokenizer's "
                        "vocabulary for exact output-layer bytes")
    if args.out:
        from megatron_offload.schedule.render import render_figure

        chosen = plan.chosen or plan.baseline
        title = (f"planned: {plan.label()}"
                 + (" (drawn per unit)" if plan.granularity == "layer" else ""))
        render_figure(chosen.simulation, args.out, title=title)
    auto_refused = auto is not None and args.offload_memory_budget_gib is not None and not auto.fits
    if args.json:
        report = plan.to_json()
        report["auto"] = None if auto is None else auto_json(auto)
        if auto is not None:
            report["auto"]["caveat"] = auto_caveat(plan, auto)
        report["ignored_flags"] = ignored
        report["warnings"] = warnings
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_plan(plan, ignored, warnings, auto))
        if args.out:
            print(f"wrote {args.out}")
    return 0 if plan.fits and not auto_refused else 1


def auto_json(auto) -> dict:
    """The ``auto`` key of ``--json``: what --offload-policy auto chooses per rank."""
    from megatron_offload.planning.costmodel import GiB

    gib = lambda b: round(b / GiB, 4)  # noqa: E731
    return {
        "memory_budget_gib": [gib(c.budget_bytes) for c in auto.ranks],
        "flags": auto.notes[-1] if auto.notes else "",
        "fits": auto.fits,
        "offloaded_units_per_rank": [len(c.offload) for c in auto.ranks],
        "units_per_rank": [c.units for c in auto.ranks],
        "offloaded_units_per_chunk": [[c.per_chunk().get(k, 0)
                                       for k in range(len(auto.unit_bytes[0]))]
                                      for c in auto.ranks],
        "predicted_peak_activation_gib": [gib(c.peak_bytes) for c in auto.ranks],
        "predicted_peak_activation_gib_without": [gib(c.peak_without_bytes) for c in auto.ranks],
        "floor_activation_gib": [gib(c.floor_bytes) for c in auto.ranks],
        "least_budget_gib": gib(auto.least_budget_bytes),
    }


def auto_caveat(plan, auto) -> str | None:
    """When the link is slower than compute (k > 1) and auto offloads, copies lag: a unit's
    device memory is reusable only once its copy has read it, so the device can hold more than
    the op-boundary prediction (the table's time-simulated "with plan" column shows that view)."""
    if auto is None or plan.k <= 1 or not any(c.offload for c in auto.ranks):
        return None
    return (f"k = {plan.k:.2f} > 1: copies lag compute, so on the GPU a unit's memory is reused "
            "only once its copy has read it; device memory can exceed these op-boundary "
            "peaks (the table's time-simulated columns show that view): keep headroom, "
            "or offload less per rank with a larger budget")


def format_auto(auto, plan=None) -> list[str]:
    """The report's "policy auto" lines."""
    from megatron_offload.planning.costmodel import GiB

    if auto is None:
        return ["policy auto: not available (Megatron's own schedule cannot run this job)"]
    flags = auto.notes[-1] if auto.notes else ""
    lines = [f"policy auto ({flags}; the runtime's selection on Megatron's order, "
             "cost-model bytes, resident activations at op boundaries):"]
    for choice in auto.ranks:
        lines.append("  " + auto.rank_line(choice))
    if not auto.fits:
        lines.append("  policy auto would refuse to start: " + auto.does_not_fit_message())
    else:
        lines.append(f"  (least budget any rank needs: {auto.least_budget_bytes / GiB:.2f} GiB, "
                     "with every unit offloaded)")
    caveat = None if plan is None else auto_caveat(plan, auto)
    if caveat:
        lines.append(f"  caveat: {caveat}")
    return lines


def recommended_flags(plan) -> list[str]:
    """The offload flags that run ``plan`` (plus Megatron's recompute flags when the plan
    changes the recomputation)."""
    chosen = plan.chosen or plan.baseline
    policy, chunks = plan.offload_policy()
    flags = ["--offload-policy", policy]
    if chunks:
        flags += ["--offload-chunks", str(chunks)]
    if plan.granularity == "layer":
        flags += ["--offload-granularity", "layer"]
    if chosen.kind == "gis":
        flags += ["--offload-schedule", "gis", "--offload-group-size", str(chosen.group_size)]
    if chosen.setting.level:
        flags += chosen.setting.recompute.megatron_flags()
    return flags


def format_granularity(plan) -> str:
    """One line: the chosen granularity, why, and the worst rank's activations at both."""
    from megatron_offload.planning.costmodel import GiB

    peaks = plan.granularity_peaks()
    worst = lambda values: (  # noqa: E731
        "not scored" if values is None else f"{max(values) / GiB:.2f} GiB")
    layer = plan.layer
    tail = ""
    if layer is not None:
        tail = (f"; layer streaming: predicted slowdown {layer.slowdown:+.2%}, "
                f"stall {max(layer.stall_s) * 1e3:.1f} ms (simulated on "
                f"{layer.simulated_microbatches} of {plan.job.microbatches} microbatches: "
                f"up to {max(layer.copies)} copies out per rank)")
    return (f"granularity {plan.granularity} (--offload-granularity {plan.granularity}): "
            f"peak activations on the worst rank {worst(peaks['unit'])} at unit, "
            f"{worst(peaks['layer'])} at layer granularity; "
            f"{plan.granularity_reason.split(': ', 1)[-1]}{tail}")


def format_plan(plan, ignored: list[str] = (), warnings: list[str] = (), auto=None) -> str:
    from megatron_offload.planning.costmodel import GiB

    job, hw = plan.job, plan.hardware
    chosen = plan.chosen or plan.baseline
    setting = chosen.setting
    g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
    lines = [
        f"job: {job.num_layers} layers, hidden {job.hidden_size}, ffn {job.ffn}, "
        f"{job.num_attention_heads} heads / {job.query_groups} groups, "
        f"seq {job.seq_length}, micro batch {job.micro_batch_size}, {job.dtype}; "
        f"TP {job.tp}{' +SP' if job.sequence_parallel else ''}, PP {job.pp} x {job.vpp} chunks, "
        f"CP {job.context_parallel_size}, DP {job.data_parallel_size}, "
        f"{job.microbatches} microbatches per iteration",
        f"hardware: {hw.describe()}",
        f"unit (one chunk, one microbatch): {job.layers_per_chunk} layers, "
        f"{setting.typical.total / GiB:.3f} GiB "
        f"({setting.typical.offloadable / GiB:.3f} GiB offloadable); "
        f"forward {setting.forward_s * 1e3:.1f} ms, backward {setting.backward_s * 1e3:.1f} ms; "
        f"k = {setting.k:.3f}",
        "",
        "rank | activations GiB (*: plan)   | static GiB | working | "
        "total GiB           | host GiB | offloaded",
        "     | without  unit     layer     | (p+g+opt)  | GiB     | "
        "without  with plan  | pinned   | units",
    ]
    peaks = plan.granularity_peaks()
    offloaded = (plan.layer.offloaded_units if plan.granularity == "layer"
                 else [len(units) for units in chosen.offloaded])
    for rank in range(job.pp):
        mark = lambda granularity: "*" if plan.granularity == granularity else " "  # noqa: E731
        layer = "      -" if peaks["layer"] is None else g(peaks["layer"][rank])
        lines.append(
            f"{rank:>4} | {g(plan.baseline.activation_bytes[rank])}  {g(peaks['unit'][rank])}"
            f"{mark('unit')}  {layer}{mark('layer')}  | {g(setting.static[rank].total)}    "
            f"| {g(setting.working[rank])} | {g(plan.baseline.memory_bytes[rank])}  "
            f"{g(plan.memory_bytes[rank])}    | {g(plan.host_bytes[rank])}  | {offloaded[rank]:>5}"
        )
    lines.append(f"budget {plan.budget_bytes / GiB:.2f} GiB per GPU; "
                 f"host {plan.host_bytes_per_node / GiB:.1f} GiB pinned per node of "
                 f"{plan.host_budget_bytes_per_node / GiB:.0f} GiB allowed")
    lines.append(format_granularity(plan))
    lines.append(f"predicted iteration time {plan.iteration_time_s:.3f} s (as given "
                 f"{plan.baseline_iteration_time_s:.3f} s): slowdown {plan.slowdown:+.2%}")
    if plan.fits:
        policy, chunks = plan.offload_policy()
        lines.append(f"PLAN: {plan.label()}, granularity {plan.granularity}  ["
                     f"{' '.join(recommended_flags(plan))}]")
    else:
        lines.append(f"DOES NOT FIT: {'at least ' if plan.missing_is_lower_bound else ''}"
                     f"{plan.missing_bytes / GiB:.2f} GiB missing on the worst rank"
                     + (f" and {plan.missing_host_bytes_per_node / GiB:.1f} GiB of "
                        "host memory per node" if plan.missing_host_bytes_per_node else ""))
        if plan.remedy is not None:
            lines.append(f"cheapest change that fits: {plan.remedy.change}")
    if auto is not None or plan.baseline.kind in ("1f1b", "interleaved"):
        lines += format_auto(auto, plan)
    lines.append("why:")
    lines += [f"  - {reason}" for reason in plan.reasons]
    for note in plan.notes:
        lines.append(f"note: {note}")
    for warning in warnings:
        lines.append(f"warning: {warning}")
    if ignored:
        lines.append("ignored by the planner: " + " ".join(ignored))
    lines.append(f"(planned in {plan.planning_s:.2f} s)")
    return "\n".join(lines)
