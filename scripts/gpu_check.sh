#!/usr/bin/env bash
# One command for a lent GPU: the offload runtime on CUDA streams and pinned memory
# (bitwise equivalence, peak memory, overlap time, D2H/H2D GB/s). Results go to $OUT (or
# ./out) as gpu_check.json and gpu_check.log. Expects torch with CUDA on the machine; the
# package itself is put on PYTHONPATH (megatron-core is not needed by this check).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -m megatron_offload.gpu_check --device cuda --json "$OUT/gpu_check.json"
} 2>&1 | tee "$OUT/gpu_check.log"
