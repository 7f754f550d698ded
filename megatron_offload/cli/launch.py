"""``python -m megatron_offload.launch path/to/pretrain_gpt.py <Megatron-LM flags>
--pipeline-offload [--offload-policy full ...]``: run a Megatron-LM pretrain script,
unmodified, with PipeOffload.

Run it wherever the script would run: under ``torchrun`` (``torchrun --nproc-per-node 8 -m
megatron_offload.launch pretrain_gpt.py ...``) or ``srun`` (Megatron reads ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` set by torchrun, or ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
``SLURM_LOCALID`` mapped to them here when torchrun is not in between). Per process:

1. the script's folder goes first on ``sys.path`` and ``sys.argv`` becomes the script's, as
   ``python pretrain_gpt.py ...`` would have them (a Megatron-LM checkout's ``megatron``
   package is found first);
2. :func:`megatron_offload.integration.megatron_lm.preflight` checks the flags against
   Megatron's own parser: bad input ends here with one error naming the flag and the fix,
   exit code 2, before ``torch.distributed`` starts;
3. :func:`megatron_offload.integration.megatron_lm.apply` adds the offload flags to Megatron's
   parser, installs the offload patches and, without a GPU, the CPU support;
4. the script runs as ``__main__`` (``runpy``); if it never called ``pretrain``, that is an
   error too.
"""
from __future__ import annotations

import os
import runpy
import sys

USAGE = (
    "usage: python -m megatron_offload.launch SCRIPT [Megatron-LM flags] --pipeline-offload "
    "[--offload-policy {none,full,chunks,auto}] [--offload-chunks K] "
    "[--offload-granularity {unit,layer}] [--offload-min-bytes BYTES] "
    "[--offload-backend {auto,cpu,cuda}] [--offload-prefetch OPS] [--offload-host-budget-gib "
    "GIB] [--offload-report]\n"
    "  SCRIPT: a Megatron-LM pretrain script (pretrain_gpt.py, examples/pretrain_gpt.py);\n"
    "  `python -m megatron_offload.launch SCRIPT --help` lists Megatron's flags and the "
    "offload flags."
)

_SLURM_TO_TORCH = (
    ("SLURM_PROCID", "RANK"), ("SLURM_NTASKS", "WORLD_SIZE"), ("SLURM_LOCALID", "LOCAL_RANK"),
    ("SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE"),
)


def rank_environment(environ: dict | None = None) -> dict:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from torchrun, else from srun's
    ``SLURM_*`` (one task per GPU); the values the caller must set (empty under torchrun)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    return {torch_name: environ[slurm_name].split("(")[0].split(",")[0]
            for slurm_name, torch_name in _SLURM_TO_TORCH if slurm_name in environ}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    script, script_args = argv[0], argv[1:]
    os.environ.update(rank_environment())

    from megatron_offload.integration import megatron_lm

    try:
        path = megatron_lm.check_script(script)
    except megatron_lm.LaunchError as error:
        megatron_lm._print_error(error)
        return 2
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.argv = [str(path), *script_args]

    import torch

    if not torch.cuda.is_available():
        from megatron_offload.integration import cpu

        cpu.quiet_import_warnings()
    try:
        launch = megatron_lm.preflight(path, script_args)
    except megatron_lm.LaunchError as error:
        megatron_lm._print_error(error)
        return 2
    state = megatron_lm.apply(launch)
    runpy.run_path(str(path), run_name="__main__")
    if state.pretrain_calls == 0 and not launch.help_requested:
        megatron_lm._print_error(megatron_lm.LaunchError(
            f"{path} finished without calling megatron.training.pretrain(...): nothing was "
            "trained; check that the script calls pretrain under `if __name__ == '__main__':`"
        ))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
