"""`megatron-offload train`: Megatron-LM's own ``pretrain()`` on a built-in GPT script, through
the launcher (``python -m megatron_offload.launch``), with PipeOffload.

It is the launcher with ``examples/pretrain_gpt.py`` and defaults for a small GPT: Megatron's
training loop, optimizer, DDP, mock or indexed data, checkpoints through ``--save``/``--load``.
Every unknown flag is a Megatron-LM flag and goes to Megatron's parser unchanged.

- Spawned (default): ``--nproc`` processes with torchrun's environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); gloo on CPU, NCCL on GPU. With
  ``--pipeline-offload`` it first runs the same job with ``--offload-policy none`` (the hooks
  measure, nothing moves), then the requested policy, and compares per-rank activation memory
  and the losses and grad norms of every iteration (bitwise).
- Under torchrun or srun (``RANK`` or ``SLURM_PROCID`` set): this process is one rank of one
  run; rank 0 prints the summary.

Each rank's full output goes to ``--log-dir``; the terminal gets Megatron's iteration lines,
the plugin's plan, schedule picture and per-iteration figures (``--verbose``: everything).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from megatron_offload.config import ENABLE_FLAG, add_offload_arguments, offload_config_from_args

SMALL_GPT = {
    "--num-layers": "8", "--hidden-size": "128", "--num-attention-heads": "4",
    "--seq-length": "64", "--max-position-embeddings": "64", "--vocab-size": "256",
    "--micro-batch-size": "2", "--global-batch-size": "16",
    "--pipeline-model-parallel-size": "4", "--num-virtual-stages-per-pipeline-rank": "2",
    "--lr": "1e-3", "--lr-decay-style": "constant", "--seed": "1234",
    "--mock-data": None, "--log-interval": "1", "--eval-iters": "0",
    "--eval-interval": "1000000", "--num-workers": "0",
}
"""Megatron-LM flags the built-in job uses unless the command line gives them."""

CPU_FLAGS = {
    "--distributed-backend": "gloo", "--transformer-impl": "local",
    "--use-cpu-initialization": None, "--no-gradient-accumulation-fusion": None,
    "--no-bias-gelu-fusion": None, "--no-bias-dropout-fusion": None,
    "--no-masked-softmax-fusion": None, "--no-persist-layer-norm": None,
    "--no-rope-fusion": None, "--attention-dropout": "0", "--hidden-dropout": "0",
}
"""Added on CPU: gloo, megatron-core's own layers, no CUDA-only fusions, and no dropout: on
CPU dropout draws from the process-wide CPU generator, which the data loader also draws from
when it starts, so a resumed run would get other masks (on GPU dropout uses the CUDA
generator, which Megatron's checkpoints restore)."""

BASELINE_DROPS = ("--save", "--save-interval")
"""The measuring run does not write checkpoints (the offload run does)."""

ITERATION_MARKS = (" iteration ", "[pipeline offload]", "megatron-offload: error", "Traceback",
                   "Error")
PLAN_STARTS = ("> pipeline offload plan", ">   pp rank", "> schedule as run", "interleaved p=",
               "1f1b p=", "rank ", "  d2h ", "  h2d ", "a-z: forward")
"""Rank 0's offload plan and schedule picture (megatron_lm.plan_lines), echoed as a block."""


def builtin_script() -> Path:
    """``examples/pretrain_gpt.py`` of this checkout, or as installed
    (megatron_offload.examples)."""
    here = Path(__file__).resolve().parents[2] / "examples" / "pretrain_gpt.py"
    if here.is_file():
        return here
    import importlib.util

    spec = importlib.util.find_spec("megatron_offload.examples.pretrain_gpt")
    if spec is None or spec.origin is None:  # pragma: no cover - broken install
        raise FileNotFoundError("the built-in pretrain script (examples/pretrain_gpt.py) is "
                                "missing")
    return Path(spec.origin)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        allow_abbrev=False,
        help="train a GPT with Megatron-LM's pretrain() and PipeOffload (CPU: gloo ranks)",
        description=(
            "Megatron-LM's pretrain() on a built-in GPT script through the launcher. Unknown "
            "flags are Megatron-LM flags (--num-layers, --pipeline-model-parallel-size, --save, "
            "--load, ...); defaults give a small GPT with PP=4 x VPP=2 on mock data."
        ),
    )
    run = parser.add_argument_group("run")
    run.add_argument("--nproc", type=int, default=4, help="ranks to spawn (world size); default 4")
    run.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="default: cuda when a GPU is visible, else cpu (gloo)")
    run.add_argument("--train-iters", type=int, default=5,
                     help="Megatron's --train-iters; default 5")
    run.add_argument("--no-baseline", action="store_true",
                     help="skip the run with --offload-policy none (no with/without comparison)")
    run.add_argument("--log-dir", default=None, help="per-rank logs (default: a new temp folder)")
    run.add_argument("--verbose", action="store_true", help="stream every rank's full output")
    run.add_argument("--json", action="store_true", help="print the results as JSON only")
    add_offload_arguments(parser)
    parser.set_defaults(_parser=parser, _accepts_unknown=True)
    return parser


# ------------------------------------------------------------------------------ job setup
def _has(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def megatron_argv(args, megatron_flags: list[str], device: str) -> list[str]:
    argv = list(megatron_flags)
    defaults = dict(SMALL_GPT)
    if device == "cpu":
        defaults.update(CPU_FLAGS)
    if _has(argv, "--num-layers-per-virtual-pipeline-stage"):
        defaults.pop("--num-virtual-stages-per-pipeline-rank")
    for flag, value in defaults.items():
        if not _has(argv, flag):
            argv += [flag] if value is None else [flag, value]
    if not _has(argv, "--train-iters"):
        argv += ["--train-iters", str(args.train_iters)]
    return argv


def drop_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without ``flags`` and their values."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in flags:
            skip = True
            continue
        if any(item.startswith(flag + "=") for flag in flags):
            continue
        out.append(item)
    return out


def offload_argv(args, *, policy: str | None = None) -> list[str]:
    """The offload flags of one run: the command line's, with the report on (the summary
    needs the measured peaks) and, for the baseline, policy none on Megatron's own schedule."""
    if not args.pipeline_offload:
        return []
    out = [ENABLE_FLAG, "--offload-report"]
    values = {
        "--offload-policy": policy or args.offload_policy,
        "--offload-chunks": None if policy == "none" else args.offload_chunks,
        "--offload-min-bytes": args.offload_min_bytes if args.offload_min_bytes is not None
        else (0 if args._device == "cpu" else None),
        "--offload-backend": args.offload_backend,
        "--offload-prefetch": args.offload_prefetch,
        "--offload-granularity": args.offload_granularity,
        "--offload-host-budget-gib": args.offload_host_budget_gib,
        # the baseline runs Megatron's own schedule: gis is then compared against it
        "--offload-schedule": None if policy == "none" else args.offload_schedule,
        "--offload-group-size": None if policy == "none" else args.offload_group_size,
    }
    for flag, value in values.items():
        if value is not None:
            out += [flag, str(value)]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Echo:
    """Copies each rank's output to its log file; echoes the lines worth seeing."""

    def __init__(self, verbose: bool, quiet: bool, nproc: int):
        self.verbose, self.quiet, self.nproc = verbose, quiet, nproc
        self.plugin = True
        """Echo the plugin's plan, picture and figures (off for the measuring baseline)."""
        self.lock = threading.Lock()

    def pump(self, rank: int, stream, log_file) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            log_file.write(line)
            log_file.flush()
            if self.quiet:
                continue
            plugin = "[pipeline offload]" in line or line.startswith(PLAN_STARTS)
            wanted = self.verbose or (
                rank in (0, self.nproc - 1) and any(m in line for m in ITERATION_MARKS)
                and (self.plugin or not plugin)
            ) or (self.plugin and rank == 0 and line.startswith(PLAN_STARTS))
            if wanted:
                with self.lock:
                    sys.stderr.write(line)
                    sys.stderr.flush()


def spawn_run(argv: list[str], nproc: int, device: str, log_dir: Path, name: str,
              echo: _Echo) -> dict:
    """One job: ``nproc`` processes of the launcher; returns rank 0's run record."""
    record_path = log_dir / f"{name}.json"
    record_path.unlink(missing_ok=True)
    port = _free_port()
    procs, pumps, logs = [], [], []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), MEGATRON_OFFLOAD_RECORD=str(record_path),
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        log_file = open(log_dir / f"{name}-rank{rank}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_offload.launch", *argv],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        pump = threading.Thread(target=echo.pump, args=(rank, proc.stdout, log_file), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)
        logs.append(log_file)
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if bad is not None:
                failed = bad
                break
            time.sleep(0.2)
        if failed is None:
            failed = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
    finally:
        if failed is not None:
            time.sleep(1.0)  # let the other ranks print their own error, if any
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                p.kill()
                p.wait()
        for pump in pumps:
            pump.join(timeout=5)
        for log_file in logs:
            log_file.close()
    if failed is not None:
        code = procs[failed].returncode
        raise RunFailed(name, failed, code, log_dir / f"{name}-rank{failed}.log")
    return json.loads(record_path.read_text())


class RunFailed(RuntimeError):
    def __init__(self, name: str, rank: int, code: int, log_path: Path):
        self.name, self.rank, self.code, self.log_path = name, rank, code, log_path
        super().__init__(f"{name} run: rank {rank} exited with code {code} (log: {log_path})")

    def error_line(self) -> str | None:
        for path in sorted(self.log_path.parent.glob(f"{self.name}-rank*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("megatron-offload: error:"):
                    return line
        return None

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------------------ summary
def _by_rank(record: dict, key: str) -> list:
    return [_last(rank, key) for rank in record["ranks"]]


def _last(rank: dict, key: str):
    values = [it.get(key) for it in rank["iterations"] if it.get(key) is not None]
    return values[-1] if values else None


def summarize(main: dict, baseline: dict | None) -> dict:
    from megatron_offload.integration.megatron_lm import losses_and_norms

    losses, norms = losses_and_norms(main)
    times = [max((it.get("time_s") or 0.0) for it in its)
             for its in zip(*(r["iterations"] for r in main["ranks"]))]
    result = {
        "losses": [loss for _, loss in losses],
        "grad_norms": [norm for _, norm in norms],
        "iterations": [i for i, _ in losses],
        "iteration_time_s": times,
        "peak_activation_bytes": _by_rank(main, "peak_resident_bytes"),
        "offloaded_bytes": _by_rank(main, "offloaded_bytes"),
        "reloaded_bytes": _by_rank(main, "reloaded_bytes"),
        "host_pool_bytes": _by_rank(main, "host_pool_bytes"),
        "megatron_core_version": main["megatron_core_version"],
        "device": main["device"],
        "world_size": main["world_size"],
        "pipeline_parallel_size": main["pipeline_parallel_size"],
        "virtual_pipeline_size": main["virtual_pipeline_size"],
        "model": main["model"],
        "offload": main["offload"],
    }
    if baseline is not None:
        base_losses, base_norms = losses_and_norms(baseline)
        mismatches = [
            f"iteration {i}: {what} {a!r} with offload vs {b!r} without"
            for what, mine, theirs in (("loss", losses, base_losses),
                                       ("grad norm", norms, base_norms))
            for (i, a), (_, b) in zip(mine, theirs) if a != b
        ]
        if len(losses) != len(base_losses) or len(norms) != len(base_norms):
            mismatches.append("the two runs logged different iterations")
        result["baseline_peak_activation_bytes"] = _by_rank(baseline, "peak_resident_bytes")
        result["bitwise_identical_to_baseline"] = not mismatches
        result["mismatches"] = mismatches[:20]
    return result


def _mib(n) -> str:
    return "     n/a" if n is None else f"{n / 2**20:8.2f}"


def render_report(result: dict) -> str:
    model = result["model"]
    offload = result["offload"]
    lines = [
        "",
        f"megatron-offload train: Megatron-LM pretrain() (megatron-core "
        f"{result['megatron_core_version']}), GPT {model['num_layers']} layers, hidden "
        f"{model['hidden_size']}, seq {model['seq_length']}, micro-batch "
        f"{model['micro_batch_size']} | PP={result['pipeline_parallel_size']} "
        f"VPP={result['virtual_pipeline_size']}, {model['microbatches']} microbatches | "
        f"{result['world_size']} {'gloo ranks on CPU' if result['device'] == 'cpu' else 'GPUs'}",
        "",
        "iteration  loss          grad norm   time/iter",
    ]
    for i, loss, norm, t in zip(result["iterations"], result["losses"], result["grad_norms"],
                                result["iteration_time_s"]):
        lines.append(f"{i:>9}  {loss:.8f}  {norm if norm is not None else float('nan'):10.6f}  "
                     f"{t:7.3f} s")
    if "baseline_peak_activation_bytes" in result:
        lines += [
            "",
            f"per-rank activation memory (measured, last iteration; policy {offload['policy']}):",
            "rank | peak without offload | peak with offload | "
            "reduction | offloaded/iter | host pool",
        ]
        for rank, (before, after, moved, pool) in enumerate(zip(
                result["baseline_peak_activation_bytes"], result["peak_activation_bytes"],
                result["offloaded_bytes"], result["host_pool_bytes"])):
            cut = 100.0 * (1 - after / before) if before and after is not None else 0.0
            lines.append(f"{rank:>4} | {_mib(before)} MiB         | {_mib(after)} MiB      | "
                         f"{cut:7.1f}% | {_mib(moved)} MiB   | {_mib(pool)} MiB")
        lines += [
            "",
            "losses and grad norms, every iteration, bitwise identical to --offload-policy none: "
            + ("yes" if result["bitwise_identical_to_baseline"]
               else "NO\n  " + "\n  ".join(result["mismatches"])),
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command
def _device(args) -> str:
    if args.device is not None:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args, megatron_flags: list[str] | None = None) -> int:
    parser = args._parser
    megatron_flags = list(megatron_flags or [])
    args._device = _device(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no GPU is visible here; use --device cpu (gloo ranks)")
    if args.nproc < 1:
        parser.error(f"--nproc {args.nproc} must be >= 1")
    try:  # the offload flags alone; against Megatron's flags every rank checks before start
        offload_config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    import importlib.util

    if importlib.util.find_spec("megatron.training") is None:
        parser.error(
            "Megatron-LM's training loop (megatron/training) is not installed: megatron-core "
            ">= 0.17 ships it (pip install 'megatron-core>=0.17', Python >= 3.12), or put a "
            "Megatron-LM checkout on PYTHONPATH"
        )
    script = str(builtin_script())
    base = [script, *megatron_argv(args, megatron_flags, args._device)]
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ:
        return _run_in_this_process(args, base)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="megatron-offload-train-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    echo = _Echo(args.verbose, args.json, args.nproc)
    say = ((lambda *a: None) if args.json
           else (lambda text: print(text, file=sys.stderr, flush=True)))
    started = time.perf_counter()
    try:
        baseline = None
        if args.pipeline_offload and not args.no_baseline:
            say("[train] baseline run: --pipeline-offload --offload-policy none (the hooks "
                "measure, nothing moves) ...")
            echo.plugin = False
            baseline = spawn_run(drop_flags(base, BASELINE_DROPS)
                                 + offload_argv(args, policy="none"),
                                 args.nproc, args._device, log_dir, "baseline", echo)
        echo.plugin = True
        policy = args.offload_policy or "full"
        say(f"[train] offload run: --offload-policy {policy} ..." if args.pipeline_offload
            else "[train] run without offload (add --pipeline-offload to offload) ...")
        main = spawn_run(base + offload_argv(args), args.nproc, args._device, log_dir,
                         "offload" if args.pipeline_offload else "run", echo)
    except RunFailed as failure:
        line = failure.error_line()
        print(line if line else f"megatron-offload train: {failure}\n{failure.tail()}",
              file=sys.stderr)
        return 2 if failure.code == 2 else 1
    result = summarize(main, baseline)
    result["wall_time_s"] = time.perf_counter() - started
    result["log_dir"] = str(log_dir)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_report(result))
        print(f"\nper-rank logs: {log_dir}")
    return 1 if result.get("bitwise_identical_to_baseline") is False else 0


def _run_in_this_process(args, base: list[str]) -> int:
    """Under torchrun / srun: this process is one rank of a single run (no baseline)."""
    from megatron_offload.cli import launch

    folder = Path(args.log_dir or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "megatron-offload-train.json"
    os.environ.setdefault("MEGATRON_OFFLOAD_RECORD", str(record))
    code = launch.main(base + offload_argv(args))
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if code == 0 and rank == "0" and Path(os.environ["MEGATRON_OFFLOAD_RECORD"]).is_file():
        result = summarize(json.loads(Path(os.environ["MEGATRON_OFFLOAD_RECORD"]).read_text()),
                           None)
        print(json.dumps(result, indent=2) if args.json else render_report(result))
    return code
