#!/usr/bin/env bash
# The lint and the test suite (CPU, gloo) on every environment the project supports, each
# bootstrapped first:
#   fast      Python 3.12 without torch (.venv-fast), first, before any torch environment is
#             built: the lint (ruff check ., ruff.toml), then the fast lane (FAST_TESTS: the
#             pure-Python tests), in seconds;
#   default   Python 3.12 + megatron-core 0.19.2 (.venv): every other test (every test when
#             fast is not among the environments);
#   mcore016  Python 3.11 + megatron-core 0.16.1 (.venv-mcore016): the tests that import
#             torch or megatron-core (MEGATRON_TESTS).
# Extra arguments go to every pytest run, e.g. `bash scripts/run_tests.sh -m "not slow"`.
#   MEGATRON_OFFLOAD_TEST_ENVS  the environments to run (default: "fast default mcore016"); fast
#                               runs first wherever it is listed, the others in the given order
# Every run happens even after a failure; exits non-zero if the lint or any run failed; the
# summary at the end has one line per run, naming its environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ENVS="${MEGATRON_OFFLOAD_TEST_ENVS:-fast default mcore016}"

# The fast lane: tests that import neither torch nor megatron-core, not even through a helper
# (a torch test put here fails in .venv-fast: put it outside these paths). Whole folders, so
# that files can move within them.
FAST_TESTS=(tests/schedule tests/planner tests/patches tests/test_layering.py
            tests/test_architecture.py tests/test_cli_flags.py)
# The tests that depend on torch or megatron-core (run on every torch environment).
MEGATRON_TESTS=(tests/runtime tests/integration tests/testing tests/test_cli.py)

status=0
summary=()
record() {  # record LABEL TOOL RC SECONDS: one summary line
  if [ "$3" -eq 0 ]; then
    summary+=("$1: passed ($4 s)")
  else
    status=1
    summary+=("$1: FAILED ($2 exit $3, $4 s)")
  fi
}

torch_envs=()
run_fast=false
for env in $ENVS; do
  if [ "$env" = fast ]; then run_fast=true; else torch_envs+=("$env"); fi
done

if $run_fast; then
  fast_venv="$(bash "$ROOT/scripts/bootstrap.sh" fast)"
  label="[lint] $("$fast_venv/bin/ruff" --version)"
  echo "=== $label: ruff check ." >&2
  start=$SECONDS rc=0
  "$fast_venv/bin/ruff" check --no-cache . || rc=$?
  record "$label" ruff "$rc" $((SECONDS - start))
  label="[fast] $("$fast_venv/bin/python" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])'), no torch"
  echo "=== $label: pytest ${FAST_TESTS[*]} $*" >&2
  start=$SECONDS rc=0
  "$fast_venv/bin/python" -m pytest "${FAST_TESTS[@]}" "$@" || rc=$?
  record "$label" pytest "$rc" $((SECONDS - start))
fi

declare -A VENVS
for env in "${torch_envs[@]}"; do  # all of them first: a broken install fails before their tests
  VENVS[$env]="$(bash "$ROOT/scripts/bootstrap.sh" "$env")"
done

for env in "${torch_envs[@]}"; do
  case "$env" in
    default) paths=(tests)
             if $run_fast; then paths+=("${FAST_TESTS[@]/#/--ignore=}"); fi ;;
    *) paths=("${MEGATRON_TESTS[@]}") ;;
  esac
  python="${VENVS[$env]}/bin/python"
  version="$("$python" -c 'import sys; from megatron.core import package_info as p; print("Python %d.%d + megatron-core %s" % (sys.version_info[:2] + (p.__version__.split("+")[0],)))' 2>/dev/null)"
  label="[$env] $version"
  echo "=== $label: pytest ${paths[*]} $*" >&2
  start=$SECONDS rc=0
  "$python" -m pytest "${paths[@]}" "$@" || rc=$?
  record "$label" pytest "$rc" $((SECONDS - start))
done
printf '%s\n' "${summary[@]}" >&2
exit $status
