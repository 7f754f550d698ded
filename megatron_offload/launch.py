"""``python -m megatron_offload.launch SCRIPT <Megatron-LM flags> --pipeline-offload``.

The launcher's public entry point, at the path that users, ``torchrun -m`` and the sbatch
scripts run; the command itself is :mod:`megatron_offload.cli.launch`.
"""
import sys

from megatron_offload.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
