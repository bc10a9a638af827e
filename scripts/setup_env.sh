#!/usr/bin/env bash
# Create or update a project environment if missing or stale. Idempotent: a re-run with unchanged requirements
# and pyproject.toml does nothing.
# Usage: scripts/setup_env.sh [main|label]
#   main  (.venv, requirements.txt): the package, the Deploy app, the bundle and the tests.
#   label (.venv-label, label/requirements.txt): the MONAI Label server. Separate because monailabel 0.8.5
#         needs numpy<2 and pydicom 2.x (pydicom-seg, numpymaxflow, pynetdicom 2); the Deploy SDK needs pydicom 3.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-main}"
case "$kind" in
  main) VENV="${SPINEPATH_VENV:-.venv}"; REQ=requirements.txt; STAMP=.spinepath-env ;;
  label) VENV="${SPINEPATH_LABEL_VENV:-.venv-label}"; REQ=label/requirements.txt; STAMP=.spinepath-label-env
         EXTRA=label/ohif_patch.py ;;
  *) echo "usage: $0 [main|label]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
want="$(cat "$REQ" pyproject.toml ${EXTRA:-} | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (first run takes a few minutes) ..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
if [ "$kind" = label ]; then
  # sdists in the tree (sam2, timeloop, iopath, antlr4) build against the venv's setuptools, not an isolated
  # build env: otherwise sam2's build requirement torch>=2.5.1 would pull a second torch into a temporary env.
  # SAM2_BUILD_CUDA=0: skip sam2's optional CUDA extension (pure-Python sam2 is enough for monailabel).
  "${PIP[@]}" "setuptools<81" wheel
  SAM2_BUILD_CUDA=0 "${PIP[@]}" --no-build-isolation -r "$REQ"
else
  "${PIP[@]}" -r "$REQ"
fi
"${PIP[@]}" --no-deps --no-build-isolation -e .
# the OHIF viewer bundled with monailabel: segmentation panel in the MONAI Label mode, SEG export (see the file)
[ "$kind" = label ] && "$VENV/bin/python" label/ohif_patch.py
echo "$want" > "$VENV/$STAMP"
