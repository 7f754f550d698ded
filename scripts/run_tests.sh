#!/usr/bin/env bash
# The whole test suite (CPU, gloo): bootstraps the venv, then runs pytest. Extra arguments
# go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "${MEGATRON_OFFLOAD_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
