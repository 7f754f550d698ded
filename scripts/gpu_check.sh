#!/usr/bin/env bash
# One command for a lent GPU: the offload runtime on CUDA streams and pinned memory, with a verdict.
#
#   scripts/gpu_check.sh [gpu_check options, e.g. --rows local_fp32 --allow-not-run]
#
# Runs python -m megatron_offload.gpu_check --device cuda: the D2H/H2D link, the torch-layer
# checks, and the realistic matrix's GPU rows (megatron-core chunks in DDP with
# overlap_grad_reduce and fused wgrad accumulation, Adam between iterations; local spec fp32,
# Transformer Engine bf16 with fused RoPE, TE FP8), each without and with full offload.
# Writes $OUT/gpu_check.json and $OUT/gpu_check.log ($OUT defaults to ./out).
#
# Exit status: 0 pass; 1 a problem (results not bitwise identical, memory not freed: peak with
# offload >= without, bytes offloaded != reloaded, host pool not pinned or growing, a check
# raised); 3 no problem but some row could not run here (e.g. no Transformer Engine: not a
# pass); 124 the run passed GPU_CHECK_TIMEOUT seconds (default 420); 2 a usage error.
#
# The machine may start bare. torch with CUDA must be there. megatron-core is installed only if
# `import megatron.core` fails: from the wheel directory WHEELS (pip --no-index), else from the
# package index if one is reachable; without it the megatron rows report "not run". Transformer
# Engine is never installed here (its torch extension must be built for the local torch):
# install it beforehand, or the TE rows report "not run". To carry megatron-core to a machine
# without network (its Python there, e.g. 3.12):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2
#   WHEELS=.whl scripts/gpu_check.sh
# The release installed is MEGATRON_CORE_VERSION, by default 0.19.2 on Python 3.12 and later,
# 0.16.1 before (megatron-core 0.17+ needs Python 3.12; the plugin supports 0.16 to 0.19).
# (megatron-core needs only torch, numpy and packaging, which a CUDA torch image has.)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LIMIT="${GPU_CHECK_TIMEOUT:-420}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Bitwise comparisons need deterministic kernels: TE's attention backward without atomics.
export NVTE_ALLOW_NONDETERMINISTIC_ALGO=0

install_megatron_core() {
  if "$PY" -c "import megatron.core" 2>/dev/null; then
    return 0
  fi
  local version="${MEGATRON_CORE_VERSION:-}"
  if [ -z "$version" ]; then
    if "$PY" -c "import sys; sys.exit(sys.version_info < (3, 12))"; then version=0.19.2; else version=0.16.1; fi
  fi
  if [ -n "${WHEELS:-}" ]; then
    echo "megatron-core missing: installing megatron-core==$version from $WHEELS"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "megatron-core==$version"
  else
    echo "megatron-core missing and WHEELS unset: trying the package index"
    "$PY" -m pip install -q --retries 0 --timeout 15 "megatron-core==$version"
  fi
  "$PY" -c "import megatron.core; print('megatron-core', megatron.core.__version__)" ||
    echo "megatron-core still not importable: the megatron rows will report 'not run'"
}

run() {
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  install_megatron_core
  "$PY" -c "import transformer_engine, transformer_engine.pytorch as te; print('transformer_engine', transformer_engine.__version__)" 2>/dev/null ||
    echo "transformer_engine not importable: the TE check and rows will report 'not run'"
  start=$(date +%s)
  timeout --kill-after=20 "$LIMIT" "$PY" -m megatron_offload.gpu_check --device cuda \
    --json "$OUT/gpu_check.json" "$@"
  status=$?
  echo "gpu_check exit status $status after $(( $(date +%s) - start )) s"
  return $status
}

run "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
