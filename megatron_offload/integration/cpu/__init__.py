"""Running Megatron on a CPU-only machine (demos, CI, laptops): a product feature.

- :mod:`.core`: reversible shims that let megatron-core's models, schedules, p2p and
  optimizers run without CUDA on gloo (``apply_cpu_shims`` / ``remove_cpu_shims``).
- :mod:`.training`: the fixes Megatron-LM's own loop (``megatron.training.pretrain``) needs
  on top (``apply_training_shims`` / ``remove_training_shims``).

The launcher applies ``training.apply_training_shims`` (which applies ``core``'s first) only
when ``torch.cuda.is_available()`` is False; on a GPU machine every function here does
nothing. Nothing here imports the test harness (the harness imports this package, not the
reverse).
"""
from __future__ import annotations

import argparse
import logging
import warnings

# Import-time noise on a machine without CUDA, Apex or Transformer Engine: every message below
# is about an optional accelerator path that a CPU run does not take, repeated by every rank.
# Errors and every other warning stay visible.
QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r".*(?:[Aa]pex|APEX).*", UserWarning),
    (r".*[Tt]ransformer[ _-]?[Ee]ngine.*", UserWarning),
    (r".*\bTE\b.*", UserWarning),
    (r".*CUDA.*(?:not available|initiali[sz]).*", UserWarning),
    (r".*(?:nvidia[-_]resiliency|nvrx|one_logger|modelopt|flash.?attn|mamba|causal_conv1d"
     r"|absl).*", UserWarning),
    (r".*is experimental and still under active development.*", UserWarning),
    (r".*'pin_memory' argument is set as true but no accelerator is found.*", UserWarning),
    (r".*", DeprecationWarning),
    (r".*", FutureWarning),
)
QUIET_LOGGERS = ("torch.utils.cpp_extension",)
"""Loggers whose import-time warnings (no CUDA runtime found) are lowered to errors only."""


def quiet_import_warnings() -> None:
    """Filter the import-time warnings of a CPU run (missing Apex/TE/CUDA, deprecations).
    Call before importing megatron; errors are untouched."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def check_megatron_args(args: argparse.Namespace) -> str | None:
    """What a CPU-only machine cannot run, as one message naming the flag and the fix."""
    backend = getattr(args, "distributed_backend", "nccl")
    if backend != "gloo":
        return (
            f"no GPU on this machine, and --distributed-backend {backend} needs one: add "
            "--distributed-backend gloo (Megatron-LM then runs on CPU through "
            "megatron_offload.integration.cpu)"
        )
    for flag, dest in (("--fp16", "fp16"), ("--fp8-format", "fp8")):
        if getattr(args, dest, None):
            return f"no GPU on this machine: {flag} needs one; drop {flag} (use fp32 or --bf16)"
    if getattr(args, "transformer_impl", "local") == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            return (
                "--transformer-impl transformer_engine (Megatron's default) needs Transformer "
                "Engine and a GPU: add --transformer-impl local on this CPU-only machine"
            )
    return None


__all__ = [
    "check_megatron_args", "quiet_import_warnings", "QUIET_WARNINGS",
]
