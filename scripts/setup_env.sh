#!/usr/bin/env bash
# Create or update the project environment (.venv) if missing or stale. Idempotent: a re-run with unchanged
# requirements does nothing. Usage: scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SPINEPATH_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
want="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.spinepath-env" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (first run takes a few minutes) ..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "$want" > "$VENV/.spinepath-env"
