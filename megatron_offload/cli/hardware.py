"""``python -m megatron_offload.cli.hardware [--measure | --refresh]``: list the GPU presets,
or measure this node's GPU (CUDA; cached per node under ``~/.cache/megatron-offload``)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from megatron_offload.planning.hardware import PRESETS, measure_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Show the GPU presets, or measure this node's GPU (CUDA).")
    parser.add_argument("--measure", action="store_true",
                        help="measure (or read the cached measurement of) this node")
    parser.add_argument("--refresh", action="store_true", help="measure again even if cached")
    args = parser.parse_args(argv)
    if args.measure or args.refresh:
        from megatron_offload.runtime.link_probe import cuda_device_probe  # torch: only to measure

        print(json.dumps(asdict(measure_device(probe=cuda_device_probe, refresh=args.refresh)),
                         indent=2))
    else:
        for hardware in PRESETS.values():
            print(hardware.describe())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
