#!/usr/bin/env bash
# The supported megatron-core releases that CI does not run: 0.17.1 and 0.18.2 (Python 3.12).
# Builds (or reuses) one venv per release with scripts/bootstrap.sh (.venv-mcore017,
# .venv-mcore018; each pins torch==2.13.0, the 2.7 GB CUDA build on 3.12, from pip's cache
# after the first time) and runs the tests that import torch or megatron-core there
# (MEGATRON_TESTS in scripts/run_tests.sh: tests/runtime, tests/integration, tests/testing,
# tests/test_cli.py), including the check of the release fact table in
# megatron_offload/releases.py against each release's own source.
#
#   bash scripts/check_megatron_versions.sh                 both releases
#   bash scripts/check_megatron_versions.sh -x -q           extra arguments go to pytest
#   MEGATRON_OFFLOAD_TEST_ENVS=mcore018 bash scripts/check_megatron_versions.sh   one release
#   MEGATRON_OFFLOAD_VENV_ROOT=/path   where the venvs live (default: the repository)
#
# Needs about 10 GB of disk for the two venvs and network access the first time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MEGATRON_OFFLOAD_TEST_ENVS="${MEGATRON_OFFLOAD_TEST_ENVS:-mcore017 mcore018}"
exec bash "$ROOT/scripts/run_tests.sh" "$@"
