#!/usr/bin/env bash
# Issue 13 on a lent GPU machine: the SPIDER grader's 5-fold search (model card, "spider_resnet5") in one call.
#
# The device machine receives the working tree and at most 64 MiB of carried ignored paths, not ../shared/data,
# and has its own Python + PyTorch. Prepare here (both land in the git-ignored .gpu/):
#   scripts/offline_gpu_pack.sh                     # .gpu/site.tar.xz + .gpu/optuna.tar.xz: the wheels it lacks
#   scripts/gpu_spider_search.sh --prepare          # .gpu/spider_midsag: a copy of the shared folder (31 MB)
# and untrack the weights the search does not read (it needs only the detector, bundle/models/model.pt):
#   git rm -q --cached bundle/models/{grader,segmentation,spider_grader}.pt   # + list them in .git/info/exclude
# Device call (the `run` tool): command "bash scripts/gpu_spider_search.sh 9", carry [".gpu/site.tar.xz",
# ".gpu/optuna.tar.xz", ".gpu/spider_midsag"] (about 45 MB with the tree); then `git reset -q bundle/models` and
# remove the exclude lines. What comes back under $OUT: the Optuna study (spider.db: every finished trial, also
# when the time limit stops the search), the best parameters (spider_params.json: the committed file, updated
# once the asked trials finish) and the log. Retrain the winner on the GPU or here with
# `spinepath train spider --params-file ...`.
#
# Usage: gpu_spider_search.sh [MINUTES=9] [DEVICE=cuda] [EXTRA spinepath search spider ARGS...]
#        gpu_spider_search.sh --prepare
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
    rm -rf .gpu/spider_midsag && mkdir -p .gpu && cp -r ../shared/data/spider_midsag .gpu/spider_midsag
    du -sh .gpu/spider_midsag
    exit 0
fi
minutes=${1:-9}
device=${2:-cuda}
shift $(( $# < 2 ? $# : 2 ))
out=${OUT:-runs/gpu_spider}
mkdir -p "$out"
# the committed parameters are the search's base (enqueued trials keep what they do not name) and its output
cp spinepath/configs/spider_params.json "$out/spider_params.json"
# the device's own Python lacks MONAI, Optuna, ...: the packs (built for its Python version) supply them
if ! python3 -c "import monai, optuna" 2>/dev/null; then
    for pack in .gpu/site.tar.xz .gpu/optuna.tar.xz; do
        [[ -f /tmp/gsite/.${pack##*/} ]] || { tar xJf "$pack" -C /tmp && touch "/tmp/gsite/.${pack##*/}"; }
    done
    export PYTHONPATH=/tmp/gsite:$PWD
fi
export PYTHONUNBUFFERED=1
data=.gpu  # the data root: it holds spider_midsag/
[[ -d $data/spider_midsag ]] || data=../shared/data
workers=$(( $(nproc) > 8 ? 7 : 0 ))
rc=0
timeout $(( minutes * 60 )) python3 -m spinepath -q search spider --study spider_resnet5 \
    --models resnet10_narrow,resnet18_narrow --scored-folds 5 --trials 20 --seed 0 \
    --device "$device" --workers "$workers" --data-root "$data" \
    --storage "sqlite:///$out/spider.db" --params-file "$out/spider_params.json" \
    --enqueue '[{}, {"crop_px": 96}, {"lr": 0.0024}, {"crop_norm": "crop"}, {"model": "resnet10_narrow"}]' "$@" \
    > "$out/search.log" 2>&1 || rc=$?
echo "search rc $rc (124: stopped by the $minutes-minute limit; finished trials are in spider.db)" >> "$out/search.log"
python3 - "$out/spider.db" <<'EOF' | tee -a "$out/search.log"
import sys
import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)
try:
    study = optuna.load_study(study_name="spider_resnet5", storage=f"sqlite:///{sys.argv[1]}")
except KeyError:
    sys.exit("no study was created: see the log above")
for t in study.trials:
    print(t.number, t.state.name, t.value, t.params, t.user_attrs.get("fold_scores"))
EOF
