#!/usr/bin/env bash
# Issue 13 on a lent GPU machine: a longer SimCLR pretraining of the SPIDER network's backbone in one call.
#
# The device machine receives the working tree and at most 64 MiB of carried ignored paths, not ../shared/data,
# and has its own Python + PyTorch. Prepare here (both land in the git-ignored .gpu/):
#   scripts/offline_gpu_pack.sh                                 # .gpu/site.tar.xz: the wheels it lacks (MONAI, ...)
#   python scripts/pack_pretrain_images.py --spider             # .gpu/pretrain_images.npz.xz (36 MB, 819 images)
# Device call (the `run` tool): command "bash scripts/gpu_pretrain.sh 9 400", carry [".gpu/site.tar.xz",
# ".gpu/pretrain_images.npz.xz"] (about 45 MB with the tree). The views are cut by loader processes (one per
# core but one), the network trains on the GPU; the backbone is written after every epoch, so what the time
# limit leaves is a usable backbone. What comes back under $OUT: backbone.pt and the log. Then, here:
#   spinepath train spider --init OUT/backbone.pt --out-dir runs/spider_sslgpu --num-threads 2      # 12 min
#   python scripts/compare_spider_runs.py runs/spider_ssl runs/spider_sslgpu
#
# Usage: gpu_pretrain.sh [MINUTES=9] [EPOCHS=400] [DEVICE=cuda] [EXTRA spinepath train pretrain ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-9}
epochs=${2:-400}
device=${3:-cuda}
shift $(( $# < 3 ? $# : 3 ))
out=${OUT:-runs/gpu_pretrain}
mkdir -p "$out"
# the device's own Python lacks MONAI: the pack (built for its Python version) supplies it
if ! python3 -c "import monai" 2>/dev/null; then
    [[ -f /tmp/gsite/.site.tar.xz ]] || { tar xJf .gpu/site.tar.xz -C /tmp && touch /tmp/gsite/.site.tar.xz; }
    export PYTHONPATH=/tmp/gsite:$PWD
fi
export PYTHONUNBUFFERED=1
workers=$(( $(nproc) > 2 ? $(nproc) - 1 : 0 ))
rc=0
# --time-budget cuts the epochs and the cosine schedule to what fits (timed on the second epoch)
python3 -m spinepath train pretrain --pack .gpu/pretrain_images.npz.xz --model resnet18_narrow --crop-mm 64 \
    --epochs "$epochs" --time-budget $(( minutes - 1 )) --device "$device" --workers "$workers" \
    --out "$out/backbone.pt" "$@" > "$out/pretrain.log" 2>&1 || rc=$?
echo "pretrain rc $rc" >> "$out/pretrain.log"
tail -3 "$out/pretrain.log"
