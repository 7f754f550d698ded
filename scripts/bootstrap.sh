#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment: Python 3.11, torch==2.13.0 (the CPU
# build on this machine; an unpinned torch would pull a multi-GB CUDA build), megatron-core
# 0.16.1 and this package with its test and plotting extras. Idempotent and quiet when done.
#   MEGATRON_OFFLOAD_VENV  where the venv lives (default: <repo>/.venv)
#   PYTHON                 interpreter to create it with (default: python3.11)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_OFFLOAD_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
STAMP="$VENV/.megatron-offload-bootstrap"
WANT="$(cat "$ROOT/setup.py" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV with $PYTHON" >&2
  "$PYTHON" -m venv "$VENV"
fi
echo "[bootstrap] installing torch==2.13.0 (CPU), megatron-core==0.16.1, megatron-offload[test,viz]" >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "torch==2.13.0" "megatron-core==0.16.1" -e "$ROOT[test,viz]" 2>&1 \
  | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -c "import torch, megatron.core, megatron_offload" 2>/dev/null \
  || { echo "[bootstrap] install failed: see pip output above" >&2; exit 1; }
echo "$WANT" > "$STAMP"
