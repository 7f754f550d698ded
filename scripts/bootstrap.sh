#!/usr/bin/env bash
# Create (or refresh) one of the project's virtual environments; idempotent, quiet when done.
# Prints the environment's path on stdout (everything else goes to stderr).
#
#   bash scripts/bootstrap.sh             the default: .venv, Python 3.12, megatron-core 0.19.2
#   bash scripts/bootstrap.sh mcore016    .venv-mcore016, Python 3.11, megatron-core 0.16.1
#   bash scripts/bootstrap.sh mcore017    .venv-mcore017, Python 3.12, megatron-core 0.17.1
#   bash scripts/bootstrap.sh mcore018    .venv-mcore018, Python 3.12, megatron-core 0.18.2
#   bash scripts/bootstrap.sh fast        .venv-fast, Python 3.12 without torch or megatron-core:
#                                         the fast lane's tests and the lint (ruff)
# (CI runs fast, default and mcore016; scripts/check_megatron_versions.sh mcore017 and mcore018.)
#
# The fast environment has the test and plotting extras' packages (pytest, pytest-timeout,
# hypothesis, matplotlib; numpy), ruff (pinned: RUFF_VERSION) and this package with --no-deps:
# nothing downloads torch, and the bootstrap fails if torch is importable there.
# Every other environment pins torch==2.13.0 (an unpinned torch floats; on Python 3.12 pip takes
# the CUDA build, about 2.7 GB of wheels, which runs on CPU; on 3.11 the CPU build that lies
# on this machine's disk) and installs PyYAML (0.18.x imports it without declaring it) and
# this package with its test and plotting extras.
#   MEGATRON_OFFLOAD_ENV        the environment, instead of the argument (default: default)
#   MEGATRON_OFFLOAD_VENV_ROOT  the directory that holds the venvs (default: the repository)
#   PYTHON                      interpreter to create it with (default: python3.12 / python3.11)
#   PIP_CACHE_DIR               pip's cache, kept across runs; torch's wheels are kept in its
#                               megatron-offload-wheelhouse/ so that a rebuild on the same
#                               machine does not download them again
#                               (default: ${XDG_CACHE_HOME:-~/.cache}/pip)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_NAME="${1:-${MEGATRON_OFFLOAD_ENV:-default}}"
RUFF_VERSION=0.17.6  # the lint's ruff (fast environment); ruff.toml is written for it
VENV_ROOT="${MEGATRON_OFFLOAD_VENV_ROOT:-$ROOT}"
case "$ENV_NAME" in
  default)  PY_VERSION=3.12; MCORE=0.19.2; VENV="$VENV_ROOT/.venv" ;;
  mcore016) PY_VERSION=3.11; MCORE=0.16.1; VENV="$VENV_ROOT/.venv-mcore016" ;;
  mcore017) PY_VERSION=3.12; MCORE=0.17.1; VENV="$VENV_ROOT/.venv-mcore017" ;;
  mcore018) PY_VERSION=3.12; MCORE=0.18.2; VENV="$VENV_ROOT/.venv-mcore018" ;;
  fast)     PY_VERSION=3.12; MCORE=;       VENV="$VENV_ROOT/.venv-fast" ;;
  *) echo "[bootstrap] unknown environment '$ENV_NAME': default, mcore016, mcore017, mcore018 or fast" >&2
     exit 2 ;;
esac
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pip}"
STAMP="$VENV/.megatron-offload-bootstrap"
WANT="$(cat "$ROOT/setup.py" "$ROOT/scripts/bootstrap.sh" <(echo "$ENV_NAME") | sha256sum | cut -d' ' -f1)"

venv_python_version() {
  "$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ "$(venv_python_version)" = "$PY_VERSION" ]; then
  echo "$VENV"
  exit 0
fi
if [ -e "$VENV" ] && [ "$(venv_python_version)" != "$PY_VERSION" ]; then
  # e.g. a .venv made by an older bootstrap with Python 3.11: rebuild it for this environment
  if [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "[bootstrap] $VENV exists and is not a virtual environment: move it away" >&2; exit 1
  fi
  echo "[bootstrap] $VENV is not Python $PY_VERSION: recreating it" >&2
  rm -rf "$VENV"
fi
find_python() {  # $PYTHON, else pythonX.Y on PATH, else a pyenv install of X.Y
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return 0; fi
  if "python$PY_VERSION" -c '' >/dev/null 2>&1; then echo "python$PY_VERSION"; return 0; fi
  local root candidate
  root="$( (pyenv root) 2>/dev/null || echo "$HOME/.pyenv")"
  for candidate in "$root"/versions/"$PY_VERSION".*/bin/python"$PY_VERSION"; do
    if [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  return 1
}
if [ ! -x "$VENV/bin/python" ]; then
  if ! PYTHON="$(find_python)"; then
    echo "[bootstrap] Python $PY_VERSION not found: install it or set PYTHON=/path/to/python$PY_VERSION" >&2
    exit 1
  fi
  echo "[bootstrap] creating $VENV with $PYTHON" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(venv_python_version)" != "$PY_VERSION" ]; then
  echo "[bootstrap] $VENV has Python $(venv_python_version), not $PY_VERSION: set PYTHON" >&2
  exit 1
fi
if [ "$ENV_NAME" = fast ]; then
  echo "[bootstrap] fast: installing pytest, pytest-timeout, hypothesis, numpy, matplotlib," \
    "ruff==$RUFF_VERSION and megatron-offload (--no-deps: no torch) into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" numpy "matplotlib>=3.7" \
    "ruff==$RUFF_VERSION" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ROOT" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  CHECK='import importlib.util, sys, pytest, pytest_timeout, hypothesis, numpy, matplotlib
import megatron_offload
sys.exit(any(importlib.util.find_spec(name) for name in ("torch", "megatron")))'
  if ! "$VENV/bin/python" -c "$CHECK" 2>/dev/null \
      || [ "$("$VENV/bin/ruff" --version 2>/dev/null)" != "ruff $RUFF_VERSION" ]; then
    echo "[bootstrap] install failed (see pip output above), or torch / megatron-core is" \
      "importable in $VENV (the fast lane must run without them: remove $VENV)" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
  echo "$VENV"
  exit 0
fi
# torch first, from a wheelhouse kept in the pip cache directory: pip's own HTTP cache stores
# nothing when the index serves wheels without cache headers, and the 3.12 build is 2.7 GB.
WHEELHOUSE="$PIP_CACHE_DIR/megatron-offload-wheelhouse"
PYTAG="cp${PY_VERSION/./}"
mkdir -p "$WHEELHOUSE"
if ! compgen -G "$WHEELHOUSE/torch-2.13.0*-$PYTAG-$PYTAG-*.whl" >/dev/null; then
  echo "[bootstrap] $ENV_NAME: downloading torch==2.13.0 for Python $PY_VERSION into $WHEELHOUSE" >&2
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --dest "$WHEELHOUSE" \
    "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
fi
echo "[bootstrap] $ENV_NAME: installing torch==2.13.0, megatron-core==$MCORE, PyYAML," \
  "megatron-offload[test,viz] into $VENV" >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
  --find-links "$WHEELHOUSE" "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "torch==2.13.0" "megatron-core==$MCORE" "PyYAML>=6" -e "$ROOT[test,viz]" 2>&1 \
  | grep -v "^WARNING: Location" >&2 || true
CHECK='import sys, torch, yaml, megatron.core, megatron_offload
from megatron.core import package_info
sys.exit(package_info.__version__.split("+")[0] != sys.argv[1])  # "+<git sha>" inside a checkout'
if ! "$VENV/bin/python" -c "$CHECK" "$MCORE" 2>/dev/null; then
  echo "[bootstrap] install failed: see pip output above" >&2
  exit 1
fi
echo "$WANT" > "$STAMP"
echo "$VENV"
