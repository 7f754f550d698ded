#!/usr/bin/env bash
# The main job: a real pipeline-parallel GPT training run on megatron-core on this machine
# (4 ranks, gloo, interleaved 1F1B, offload on), with its per-rank memory report and schedule
# picture. Extra arguments go to `megatron-offload train` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/bootstrap.sh")"  # the default environment (Python 3.12 + megatron-core 0.19)
cd "$ROOT"
exec "$VENV/bin/megatron-offload" train "$@"
