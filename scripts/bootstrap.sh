#!/usr/bin/env bash
# Create .venv with the locked versions CI tests (requirements.lock) and install the project in it.
# Idempotent: a second run with an unchanged lock file does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "error: Python >= 3.11 is required (found $("$PY" --version 2>&1))" >&2; exit 2; }
stamp=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ -f .venv/.installed ] && [ "$(cat .venv/.installed)" = "$stamp" ]; then
  echo "bootstrap: .venv is up to date with requirements.lock"
  exit 0
fi
echo "bootstrap: creating .venv from requirements.lock (first run downloads ~1.5 GB of wheels)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip --version >/dev/null 2>&1 || .venv/bin/python -m ensurepip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check "uv==0.13.9"
# Bytecode compiled at install: with PYTHONDONTWRITEBYTECODE set (as on CI), every process would otherwise
# compile TensorFlow & co. from source on import (measured: `import tensorflow` 20 s -> 8 s).
.venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python -r requirements.lock
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .
echo "$stamp" > .venv/.installed
echo "bootstrap: done ($(.venv/bin/pneumo --version))"
