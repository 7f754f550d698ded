#!/usr/bin/env bash
# The main job: Megatron-LM's own pretrain() with the plugin, on this machine. A GPT on CPU,
# 4 gloo ranks, PP=4 x VPP=2, mock data, through the launcher (python -m
# megatron_offload.launch examples/pretrain_gpt.py ...): first with --offload-policy none (the
# hooks measure, nothing moves), then --offload-policy full. Prints Megatron's iteration lines,
# the offload plan with the schedule picture, per-rank activation memory with and without
# offload, and whether losses and grad norms are bitwise identical. Extra arguments go to
# `megatron-offload train` (see --help): Megatron-LM flags or offload flags.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/bootstrap.sh")"  # the default environment (Python 3.12 + megatron-core 0.19)
cd "$ROOT"
exec "$VENV/bin/megatron-offload" train --pipeline-offload --offload-policy full "$@"
