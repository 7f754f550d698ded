"""``megatron-offload <command>``: a small dispatcher.

Each command lives in its own module exposing ``add_parser(subparsers)`` and ``run(args)``;
modules are imported only when their command runs (or ``--help`` lists them), so
``simulate`` never pays for torch. Add a command by adding one line to COMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "plan": "megatron_offload.cli.plan",
    "simulate": "megatron_offload.cli.simulate",
    "train": "megatron_offload.cli.train",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-offload",
                                     description="PipeOffload for Megatron-Core.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, module in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=f"(see megatron-offload {name} --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command])
    if getattr(args, "_accepts_unknown", False):  # `train`: the rest are Megatron-LM flags
        return module.run(args, unknown) or 0
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return module.run(args) or 0

