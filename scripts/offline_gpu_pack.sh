#!/usr/bin/env bash
# Pack what an offline GPU machine with its own Python + PyTorch (+ timm, scikit-learn, matplotlib, pandas) lacks
# to run the chain, scripts/gpu_check.py and scripts/benchmark.py --devices cuda (issue 15): the pure-Python
# and manylinux wheels of MONAI, pydicom, highdicom, LightGBM, Dask and the DICOMweb client, unpacked into one
# folder and compressed, plus the two example studies; Optuna and its SQLite storage for `spinepath search
# spider` in a pack of their own (optuna.tar.xz, unpacked into the same /tmp/gsite; carried only for
# scripts/gpu_spider_search.sh, so that a segmentation call keeps its room for the slice pack).
#
# Usage: scripts/offline_gpu_pack.sh [OUT_DIR=.gpu] [PYTHON_VERSION=3.12]
# On the GPU machine:  tar xJf OUT_DIR/site.tar.xz -C /tmp; mkdir -p /tmp/ex; tar xJf OUT_DIR/examples.tar.xz -C /tmp/ex
#                      export PYTHONPATH=/tmp/gsite:$PWD; python3 -m spinepath export -q
#                      python3 scripts/gpu_check.py --studies /tmp/ex/chu_t2_02 /tmp/ex/chu_t2_04
# (used for the H200 figures of README "The GPU path"; the pack was 6.0 MB + 1.9 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gpu}
py=${2:-3.12}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

# pack NAME PACKAGE...: the packages' wheels for the device's Python, unpacked into gsite/ and compressed as
# $out/NAME.tar.xz (each pack unpacks into the same /tmp/gsite there)
pack() {
    local name=$1 dir="$tmp/$1"
    shift
    mkdir -p "$dir/wheels" "$dir/gsite"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dir/wheels" "$@"
    for w in "$dir"/wheels/*.whl; do unzip -q -o "$w" -d "$dir/gsite"; done
    # what never runs there: test suites, bytecode, pydicom's test files, the Dask dashboard's static files
    find "$dir/gsite" -name tests -type d -prune -exec rm -rf {} +
    find "$dir/gsite" -name __pycache__ -type d -prune -exec rm -rf {} +
    rm -rf "$dir"/gsite/pydicom/data/test_files/* "$dir"/gsite/distributed/http/static/*
    tar cf - -C "$dir" gsite | xz -9e -T2 > "$out/$name.tar.xz"
}
pack site monai==1.6.1 'pydicom>=3,<4' highdicom lightgbm dask distributed tornado zict tblib partd locket \
    dicomweb-client retrying
pack optuna optuna sqlalchemy alembic colorlog Mako MarkupSafe greenlet PyYAML
tar cf - -C ../shared/data/dicom_examples chu_t2_02 chu_t2_04 | xz -9e -T2 > "$out/examples.tar.xz"
ls -la "$out"
