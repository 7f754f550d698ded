#!/usr/bin/env bash
# The test suite (CPU, gloo) on both environments it supports, each bootstrapped first:
#   default   Python 3.12 + megatron-core 0.19.2 (.venv): every test;
#   mcore016  Python 3.11 + megatron-core 0.16.1 (.venv-mcore016): every test that imports
#             torch or megatron-core (the pure-Python schedule and planner tests ran above).
# Extra arguments go to every pytest run, e.g. `bash scripts/run_tests.sh -m "not slow"`.
#   MEGATRON_OFFLOAD_TEST_ENVS  the environments to run, in order (default: "default mcore016")
# Exits non-zero if any run failed; each run's summary line names its environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ENVS="${MEGATRON_OFFLOAD_TEST_ENVS:-default mcore016}"

# The tests that depend on torch or megatron-core (run on every environment).
MEGATRON_TESTS=(tests/runtime tests/integration tests/testing tests/test_cli.py
                tests/schedule/test_megatron_exact.py)

declare -A VENVS
for env in $ENVS; do  # all environments first: a broken install fails before any test runs
  VENVS[$env]="$(bash "$ROOT/scripts/bootstrap.sh" "$env")"
done

status=0
summary=()
for env in $ENVS; do
  case "$env" in
    default) paths=(tests) ;;
    *) paths=("${MEGATRON_TESTS[@]}") ;;
  esac
  python="${VENVS[$env]}/bin/python"
  version="$("$python" -c 'import sys; from megatron.core import package_info as p; print("Python %d.%d + megatron-core %s" % (sys.version_info[:2] + (p.__version__.split("+")[0],)))' 2>/dev/null)"
  echo "=== [$env] $version: pytest ${paths[*]} $*" >&2
  start=$SECONDS
  if "$python" -m pytest "${paths[@]}" "$@"; then
    summary+=("[$env] $version: passed ($((SECONDS - start)) s)")
  else
    rc=$?
    status=1
    summary+=("[$env] $version: FAILED (pytest exit $rc, $((SECONDS - start)) s)")
  fi
done
printf '%s\n' "${summary[@]}" >&2
exit $status
