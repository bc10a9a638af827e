#!/usr/bin/env bash
# Create or update the MONAI Label server environment (.venv-label) if missing or stale. Idempotent: a re-run
# with unchanged label/requirements.txt and pyproject.toml does nothing. Separate from .venv because
# monailabel 0.8.5 needs numpy<2 and pydicom 2.x (pydicom-seg, numpymaxflow, pynetdicom 2).
# Usage: scripts/setup_label_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SPINEPATH_LABEL_VENV:-.venv-label}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
want="$(cat label/requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.spinepath-label-env" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (first run takes several minutes) ..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
# sdists in the tree (sam2, timeloop, iopath, antlr4) build against the venv's setuptools, not an isolated
# build env: otherwise sam2's build requirement torch>=2.5.1 would pull a second torch into a temporary env.
"${PIP[@]}" "setuptools<81" wheel
# SAM2_BUILD_CUDA=0: skip sam2's optional CUDA extension (pure-Python sam2 is enough for monailabel).
SAM2_BUILD_CUDA=0 "${PIP[@]}" --no-build-isolation -r label/requirements.txt
"${PIP[@]}" --no-deps --no-build-isolation -e .
echo "$want" > "$VENV/.spinepath-label-env"
