"""Megatron-LM integration: the offload flags on Megatron's own parser, checked against
Megatron's arguments before any rank starts work, the patches installed before training,
and the offload figures in Megatron's log. The core of ``python -m megatron_offload.launch``
and of the patched ``pretrain_gpt.py`` of ``patches/``.

:func:`preflight` parses the command line with Megatron's own parser (the release installed or
the Megatron-LM checkout next to the script) plus the offload flags, and raises
:class:`LaunchError` (naming the flag and the fix) for: a script that does not exist or never
calls ``pretrain``; offload flags without ``--pipeline-offload``; ``--pipeline-offload`` with
Megatron's own activation offloading or another mode whose steps bypass the patches (the
rows of :mod:`.refusals` that name a Megatron-LM argument); an unsupported megatron-core
release (``releases.SUPPORTED_TEXT``); invalid offload values; on a machine without a GPU, a
distributed backend other than gloo. Every rank runs it on the same arguments, so every rank
fails alike, before ``torch.distributed`` is initialized.

:func:`apply` then installs patch set ``megatron-lm`` (the :class:`~.patching.PatchSet`
registry; lazily imported, all restored by :func:`remove`), which replaces:

- ``megatron.training.arguments.add_megatron_arguments``: the offload flags join Megatron's
  parser (``--help`` lists them; Megatron still rejects unknown flags). ``parse_args`` looks
  this module global up on every call in every release 0.16-0.19, so one binding reaches each
  release's argument API: the parse inside ``megatron.training.pretrain`` (0.16/0.17, next to
  the script's own ``extra_args_provider``, which Megatron-LM's ``pretrain_gpt.py`` uses for
  ModelOpt and which stays untouched), the script's ``parse_and_validate_args`` (0.18+, before
  it builds the config container), and the early ``parse_args(ignore_unknown_args=True)`` of
  ``ft_integration`` / ``inprocess_restart`` (0.17: the parse that answers ``--help``);
- ``megatron.training.training.pretrain`` and ``megatron.training.pretrain`` (the
  submodule's and the package's binding, replaced before the script imports it): notes that
  it ran and writes the run record;
- ``megatron.training.training.train``: logs the offload plan (every rank's units, offloaded
  units, predicted peak) through ``print_rank_0`` before the first iteration;
- ``megatron.training.training.training_log``: at Megatron's ``--log-interval``, one line per
  pipeline rank (offloaded / reloaded MiB, peak resident MiB, host pool MiB) through
  ``print_rank_last``, after Megatron's own iteration line;
- ``megatron.core.datasets.utils.compile_helpers``: skipped when the compiled dataset helper
  is importable and there is no Makefile to run (pip wheels; ``_compile_dependencies`` would
  otherwise exit rank 0);

and :func:`megatron_offload.integration.megatron_core.install` puts the runtime under the
pipeline schedules. On a machine without a GPU, :mod:`megatron_offload.integration.cpu` is
applied too.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_offload.config import (
    ENABLE_FLAG,
    OffloadConfig,
    add_offload_arguments,
    offload_config_from_args,
)
from megatron_offload.integration.patching import Patch, PatchSet, unwrapped
from megatron_offload.integration.refusals import MODES, launch_problem

log = logging.getLogger(__name__)

RECORD_ENV = "MEGATRON_OFFLOAD_RECORD"
"""When set, rank 0 writes the run's per-iteration record (JSON) to this path at the end of
``pretrain`` (losses, grad norms, iteration times, per-rank offload figures)."""

_MARKER = "_megatron_offload_lm_patch"
PATCH_SET = "megatron-lm"


class LaunchError(Exception):
    """Bad input, found before any rank starts work. The message names the flag and the fix."""


# ------------------------------------------------------------------------------ preflight
@dataclass(slots=True)
class Launch:
    """What :func:`preflight` found: the script, Megatron's parsed flags, the offload config."""

    script: Path | None
    argv: list[str]
    megatron_args: argparse.Namespace
    config: OffloadConfig | None
    megatron_core_version: str
    argument_api: str
    """``extra_args_provider`` (0.16/0.17) or ``parse_and_validate_args`` (0.18+)."""
    cpu: bool
    """No GPU: Megatron-LM runs on CPU (gloo) through :mod:`megatron_offload.integration.cpu`."""
    help_requested: bool = False


def script_calls_pretrain(source: str) -> bool:
    """Whether the script's code calls something named ``pretrain`` (``pretrain(...)``,
    ``training.pretrain(...)``, also after ``pretrain, store = wrap(pretrain)``)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name == "pretrain":
                return True
    return False


def check_script(script: str | os.PathLike) -> Path:
    path = Path(script)
    if not path.is_file():
        raise LaunchError(
            f"pretrain script {str(script)!r} does not exist (or is not a file): give the path "
            "of the Megatron-LM pretrain script to run, e.g. pretrain_gpt.py in your Megatron-LM "
            "checkout or examples/pretrain_gpt.py of megatron-offload"
        )
    try:
        calls = script_calls_pretrain(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError) as error:
        raise LaunchError(f"pretrain script {str(path)!r} is not Python source: {error}") from error
    if not calls:
        raise LaunchError(
            f"pretrain script {str(path)!r} never calls megatron.training.pretrain(...), so "
            f"{ENABLE_FLAG} would have nothing to run under; give a Megatron-LM pretrain script "
            "(one that calls pretrain(...))"
        )
    return path


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def argument_api() -> str:
    """How this Megatron-LM parses its flags: inside ``pretrain`` (0.16/0.17, an
    ``extra_args_provider`` parameter) or in the script (0.18+, ``parse_and_validate_args``)."""
    from megatron.training import training

    parameters = inspect.signature(_unwrapped(training.pretrain)).parameters
    return (
        "extra_args_provider" if "extra_args_provider" in parameters
        else "parse_and_validate_args"
    )


def megatron_parser() -> argparse.ArgumentParser:
    """Megatron-LM's own parser with the offload flags, without -h (the real parse has it)."""
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser = _unwrapped(add_megatron_arguments)(parser)
    return add_offload_arguments(parser)


def check_offload_against_megatron(args: argparse.Namespace, config: OffloadConfig) -> None:
    """Megatron flags that cannot run with ``--pipeline-offload`` (the refusal table,
    ``refusals.launch_problem``) and the offload values against the model; raises LaunchError."""
    problem = launch_problem(args)
    if problem:
        raise LaunchError(problem)
    chunks = virtual_stages(args)
    try:
        config.check_against_model(chunks)
    except ValueError as error:
        raise LaunchError(str(error)) from None


def virtual_stages(args: argparse.Namespace) -> int:
    """Model chunks per pipeline rank from the flags (validate_args computes the same)."""
    v = getattr(args, "num_virtual_stages_per_pipeline_rank", None)
    per_stage = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if v:
        return int(v)
    if per_stage and args.num_layers:
        return max(1, args.num_layers // pp // per_stage)
    return 1


def check_environment(args: argparse.Namespace) -> None:
    """What would fail only at the first checkpoint, minutes or hours in."""
    import importlib.util

    if getattr(args, "save", None) and getattr(args, "ckpt_format", None) == "torch_dist" and (
            importlib.util.find_spec("psutil") is None):
        raise LaunchError(
            "--save with --ckpt-format torch_dist (the default) needs psutil, which "
            "megatron-core's checkpoint writer imports but does not declare: pip install "
            "psutil, or add --ckpt-format torch"
        )


def check_release(version: str) -> None:
    from megatron_offload.releases import check_megatron_version

    try:
        check_megatron_version(version)
    except ValueError as error:
        raise LaunchError(str(error)) from None


def preflight(script: str | os.PathLike | None, argv: list[str]) -> Launch:
    """Parse ``argv`` with Megatron's parser + the offload flags and check everything that can
    be checked before any rank starts work. ``script`` None: called from inside a script
    (the ``patches/`` diffs); it is not checked."""
    path = check_script(script) if script is not None else None
    import torch

    help_requested = any(a in ("-h", "--help") for a in argv)
    args, unknown = megatron_parser().parse_known_args(argv)
    version = megatron_core_version()
    cpu = not torch.cuda.is_available()
    launch = Launch(
        script=path, argv=list(argv), megatron_args=args, config=None,
        megatron_core_version=version, argument_api=argument_api(), cpu=cpu,
        help_requested=help_requested,
    )
    if help_requested:
        return launch
    defaults = {"backend": "cpu"} if cpu else {}
    try:
        launch.config = offload_config_from_args(args, **defaults)
    except ValueError as error:
        raise LaunchError(str(error)) from None
    if launch.config is not None:
        check_release(version)
        if "--cpu-offloading" in unknown:
            # Megatron-LM 0.16-0.19 enable it with --cpu-offloading-num-layers N only; a fork may
            # still have the flag. Either way it cannot run with ours.
            raise LaunchError(MODES["cpu_offloading"].launch_message("cpu_offloading", True))
        check_offload_against_megatron(args, launch.config)
    check_environment(args)
    if cpu:
        from megatron_offload.integration import cpu as cpu_support

        problem = cpu_support.check_megatron_args(args)
        if problem:
            raise LaunchError(problem)
    return launch


# -------------------------------------------------------------------------- the patches
@dataclass(slots=True, eq=False)
class LaunchState:
    """What :func:`apply` set up in this process."""

    launch: Launch
    runtime: Any = None
    patches: PatchSet = field(
        default_factory=lambda: PatchSet(PATCH_SET, marker=_MARKER, log_level=logging.DEBUG))
    pretrain_calls: int = 0
    records: list = field(default_factory=list)
    last_log_time: float | None = None
    stats_seen: int | None = None
    cpu_applied: bool = False


_state: LaunchState | None = None


def state() -> LaunchState | None:
    return _state


def _unwrapped(fn):
    return unwrapped(fn, _MARKER)


def with_offload_arguments(extra_args_provider: Callable | None = None) -> Callable:
    """An ``extra_args_provider`` that runs the script's own provider (if any), then adds the
    offload flags to Megatron's parser. For scripts that call the integration themselves
    (``patches/``): pass it where the script passes its provider, ``pretrain(...,
    extra_args_provider=...)`` (0.16/0.17) or ``parse_and_validate_args(extra_args_provider=
    ...)`` (0.18+). The launcher does not need it (it extends ``add_megatron_arguments``)."""
    if getattr(extra_args_provider, "_megatron_offload_arguments", False):
        return extra_args_provider

    def provider(parser):
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return repair_help(add_offload_arguments(parser))

    provider._megatron_offload_arguments = True
    return provider


def repair_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Escape a bare ``%`` in help texts argparse cannot format, so ``--help`` works: in
    megatron-core 0.19.2 the help of ``--moe-paged-stash-buffer-size-factor-cuda`` ("1.10 =
    10%)") makes Megatron's own ``--help`` raise ValueError."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help:
            continue
        try:
            formatter._expand_help(action)
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")
    return parser


def _add_megatron_arguments(original):
    def add_megatron_arguments(parser):
        return repair_help(add_offload_arguments(original(parser)))

    return add_megatron_arguments


def _pretrain(st: LaunchState):
    def make(original):
        def pretrain(*args, **kwargs):
            st.pretrain_calls += 1
            result = original(*args, **kwargs)
            _write_record(st)
            return result

        return pretrain

    return make


def _train(st: LaunchState):
    def make(original):
        def train(*args, **kwargs):
            _log_plan(st)
            st.last_log_time = time.perf_counter()
            return original(*args, **kwargs)

        return train

    return make


def _training_log(st: LaunchState):
    def make(original):
        signature = inspect.signature(original)

        def training_log(*args, **kwargs):
            result = original(*args, **kwargs)
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
                _after_iteration(st, bound)
            except Exception:  # pragma: no cover - logging must never stop training
                log.exception("megatron-offload: per-iteration offload log failed")
            return result

        return training_log

    return make


def _compile_helpers(original):
    def compile_helpers(*args, **kwargs):
        from megatron.core.datasets import utils

        folder = Path(utils.__file__).parent
        if not (folder / "Makefile").exists():
            try:
                from megatron.core.datasets import helpers_cpp  # noqa: F401
            except ImportError:
                pass
            else:
                log.info("megatron-offload: dataset helpers already compiled (no Makefile in "
                         "%s): skipping make", folder)
                return None
        return original(*args, **kwargs)

    return compile_helpers


def apply(launch: Launch) -> LaunchState:
    """Install everything before the script runs (see the module docstring). Idempotent."""
    global _state
    if _state is not None:
        remove()
    import megatron.training as package
    from megatron.core.datasets import utils as dataset_utils
    from megatron.training import arguments, training

    st = LaunchState(launch=launch)
    if launch.cpu:
        from megatron_offload.integration.cpu.training import apply_training_shims

        st.cpu_applied = apply_training_shims()
    st.patches.install(launch_patches(st, package, arguments, training, dataset_utils))
    if launch.config is not None:
        from megatron_offload.integration import megatron_core

        st.runtime = megatron_core.install(launch.config)
    _state = st
    return st


def launch_patches(st: LaunchState, package, arguments, training, dataset_utils) -> list[Patch]:
    """The rows of patch set ``megatron-lm`` (see the module docstring), in order."""
    patches = [
        Patch.function(arguments, "add_megatron_arguments", _add_megatron_arguments),
        Patch.function(training, "pretrain", _pretrain(st)),
    ]
    if getattr(package, "pretrain", None) is not None:  # the package's binding: the same object
        patches.append(Patch(package, "pretrain", lambda original: training.pretrain, "value"))
    return patches + [
        Patch.function(training, "train", _train(st)),
        Patch.function(training, "training_log", _training_log(st)),
        Patch.function(dataset_utils, "compile_helpers", _compile_helpers),
    ]


def remove() -> None:
    """Undo :func:`apply`: Megatron's functions, the offload patches, the CPU support."""
    global _state
    st, _state = _state, None
    if st is None:
        return
    st.patches.restore()
    if st.runtime is not None:
        from megatron_offload.integration import megatron_core

        megatron_core.uninstall()
    if st.cpu_applied:
        from megatron_offload.integration.cpu.training import remove_training_shims

        remove_training_shims()


def setup(argv: list[str] | None = None) -> LaunchState:
    """For a pretrain script that calls the integration itself (the ``patches/`` diffs): check
    ``argv`` (default ``sys.argv[1:]``) and install the patches, exiting with the error on bad
    input. The script still passes :func:`with_offload_arguments` to Megatron's parse step."""
    import sys

    try:
        launch = preflight(None, list(sys.argv[1:] if argv is None else argv))
    except LaunchError as error:
        _print_error(error)
        raise SystemExit(2) from None
    return apply(launch)


def _print_error(error: Exception) -> None:
    import sys

    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"megatron-offload: error: {error}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ logging
def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def plan_lines(config: OffloadConfig, pp: int, vpp: int, microbatches: int,
               group_size: int | None = None, *, picture: bool = False) -> list[str]:
    """The offload plan of every pipeline rank, from the schedule IR (no collective needed:
    each rank's order is predictable from p, v, m, g)."""
    from megatron_offload.planning.policy import runtime_schedule, units_to_offload
    from megatron_offload.schedule.costs import CostModel
    from megatron_offload.schedule.megatron import megatron_schedule
    from megatron_offload.schedule.simulate import simulate

    kind = "interleaved" if vpp > 1 else "1f1b"
    costs = CostModel(forward_time=1.0, backward_time=2.0, offload_ratio=0.5)
    if config.schedule == "gis":
        import torch

        from megatron_offload.integration.gis_schedule import costs_for, planned_schedule

        backend = (
            config.backend if config.backend != "auto"
            else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        group_size = min(config.group_size or pp, microbatches)
        kind, costs = f"gis g={group_size}", costs_for(backend)
        schedule = planned_schedule(pp, vpp, microbatches, group_size, config.policy,
                                    config.offload_chunks, backend)[0]
        compute = schedule.without_offload()
        base, planned = simulate(compute, costs), simulate(schedule, costs)
    else:
        compute = megatron_schedule(kind, pp, vpp, microbatches, group_size if vpp > 1 else None)
        base = simulate(compute)
        planned = simulate(runtime_schedule(compute, config), costs)
    lines = [
        f"> pipeline offload plan: policy {config.policy}"
        + (f" (chunks 0..{config.offload_chunks - 1})" if config.policy == "chunks"
           and config.offload_chunks else "")
        + f", {kind} PP={pp} VPP={vpp}, {microbatches} microbatches, backend {config.backend}, "
        f"min bytes {config.min_offload_bytes}, prefetch {config.prefetch_distance}",
    ]
    for rank, ops in enumerate(compute.ranks):
        units = sum(1 for op in ops if op.kind.name == "FORWARD")
        moved = (sum(1 for op in planned.schedule.ranks[rank] if op.kind.name == "OFFLOAD")
                 if config.schedule == "gis" else len(units_to_offload(ops, config)))
        lines.append(
            f">   pp rank {rank}: {units} units, {moved} offloaded, peak units in flight "
            f"{base.peak_units[rank]} -> {planned.peak_units[rank]}"
        )
    if picture:
        from megatron_offload.schedule.render import render_ascii

        lines.append(
            f"> schedule as run (simulated times f=1 b=2, copies at k={costs.offload_ratio:g}):"
        )
        lines += render_ascii(planned, width=96).splitlines()
    return lines


def _log_plan(st: LaunchState) -> None:
    if st.launch.config is None:
        return
    from megatron.training import get_args, print_rank_0

    args = get_args()
    pp = args.pipeline_model_parallel_size
    vpp = args.virtual_pipeline_model_parallel_size or 1
    m = _num_microbatches()
    group = getattr(args, "microbatch_group_size_per_vp_stage", None) or pp
    try:
        lines = plan_lines(st.launch.config, pp, vpp, m, group,
                           picture=st.launch.config.measure_memory)
    except ValueError as error:  # a layout Megatron accepts but the schedule IR does not
        lines = [f"> pipeline offload plan: not predicted here ({error})"]
    print_rank_0("\n".join(lines))


def _num_microbatches() -> int | None:
    try:
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        return get_num_microbatches()
    except Exception:  # pragma: no cover - calculator not set up
        return None


def _scalar(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _after_iteration(st: LaunchState, bound: dict) -> None:
    from megatron.training import get_args

    args = get_args()
    iteration = bound.get("iteration")
    now = time.perf_counter()
    elapsed = None if st.last_log_time is None else now - st.last_log_time
    st.last_log_time = now
    stats = None
    if st.runtime is not None:
        history = st.runtime.iteration_stats
        if history and len(history) and history[-1].iteration != st.stats_seen:
            stats = history[-1]
            st.stats_seen = stats.iteration
    loss_dict = bound.get("loss_dict") or {}
    record = {
        "iteration": iteration,
        "loss": next((_scalar(v) for k, v in loss_dict.items() if "loss" in k), None),
        "grad_norm": _scalar(bound.get("grad_norm")),
        "skipped": bool(_scalar(bound.get("skipped_iter"))),
        "time_s": elapsed,
    }
    if stats is not None:
        record.update(
            offloaded_bytes=stats.offloaded_bytes, reloaded_bytes=stats.reloaded_bytes,
            peak_resident_bytes=stats.peak_resident_bytes,
            peak_saved_bytes=stats.peak_saved_bytes, host_pool_bytes=stats.host_pool_bytes,
            offloaded_units=stats.offloaded_units, units=stats.units,
        )
    st.records.append(record)
    if st.runtime is not None and iteration and iteration % args.log_interval == 0:
        _log_figures(st, record, iteration, args)


def _log_figures(st: LaunchState, record: dict, iteration: int, args) -> None:
    """One line per pipeline rank (max over its data/tensor-parallel ranks), printed by the
    last rank after Megatron's own iteration line."""
    import torch
    from megatron.core import parallel_state
    from megatron.training import print_rank_last

    fields_ = ("offloaded_bytes", "reloaded_bytes", "peak_resident_bytes", "host_pool_bytes")
    device = torch.device("cuda", torch.cuda.current_device()) if (
        torch.cuda.is_available() and not st.launch.cpu) else torch.device("cpu")
    mine = torch.tensor(
        [float(parallel_state.get_pipeline_model_parallel_rank())]
        + [float(record.get(f, 0) or 0) for f in fields_], dtype=torch.float64, device=device)
    world = torch.distributed.get_world_size()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(gathered, mine)
    per_stage: dict[int, list[float]] = {}
    for row in gathered:
        values = row.tolist()
        stage = int(values[0])
        best = per_stage.setdefault(stage, [0.0] * len(fields_))
        per_stage[stage] = [max(a, b) for a, b in zip(best, values[1:])]
    report = st.launch.config.measure_memory
    lines = []
    for stage in sorted(per_stage):
        off, rel, peak, pool = per_stage[stage]
        lines.append(
            f" [pipeline offload] iteration {iteration:8d}/{args.train_iters:8d} | pp rank "
            f"{stage} | offloaded (MiB): {_mib(off)} | reloaded (MiB): {_mib(rel)} | "
            f"peak resident (MiB): {_mib(peak) if report else 'n/a (--offload-report)'} | "
            f"host pool (MiB): {_mib(pool)} |"
        )
    print_rank_last("\n".join(lines))


def _write_record(st: LaunchState) -> None:
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    import torch
    from megatron.core import parallel_state
    from megatron.training import get_args

    args = get_args()
    mine = {
        "rank": torch.distributed.get_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "iterations": st.records,
    }
    world = torch.distributed.get_world_size()
    every = [None] * world if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(mine, every, dst=0)
    if torch.distributed.get_rank() != 0:
        return
    config = st.launch.config
    record = {
        "megatron_core_version": st.launch.megatron_core_version,
        "argument_api": st.launch.argument_api,
        "device": "cpu" if st.launch.cpu else "cuda",
        "world_size": world,
        "pipeline_parallel_size": args.pipeline_model_parallel_size,
        "virtual_pipeline_size": args.virtual_pipeline_model_parallel_size or 1,
        "model": {
            "num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
            "global_batch_size": args.global_batch_size,
            "microbatches": _num_microbatches(),
        },
        "offload": None if config is None else {
            "policy": config.policy, "offload_chunks": config.offload_chunks,
            "min_offload_bytes": config.min_offload_bytes, "backend": config.backend,
            "measure_memory": config.measure_memory,
        },
        "ranks": sorted(every, key=lambda r: r["rank"]),
    }
    Path(path).write_text(json.dumps(record, indent=1, allow_nan=True))


def losses_and_norms(record: dict) -> tuple[list, list]:
    """(iteration, loss) and (iteration, grad norm) lists from a run record: the loss from the
    rank that has it (the last pipeline stage), the norm from rank 0."""
    losses, norms = {}, {}
    for rank in record["ranks"]:
        for it in rank["iterations"]:
            if it.get("loss") is not None and not math.isnan(it["loss"]):
                losses.setdefault(it["iteration"], it["loss"])
            if rank["rank"] == 0:
                norms[it["iteration"]] = it.get("grad_norm")
    return sorted(losses.items()), sorted(norms.items())


__all__ = [
    "LaunchError", "Launch", "LaunchState", "preflight", "apply", "remove", "setup",
    "with_offload_arguments", "check_script", "script_calls_pretrain", "plan_lines",
    "RECORD_ENV", "losses_and_norms",
]
