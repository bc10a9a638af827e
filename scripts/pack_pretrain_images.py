"""Pack the self-supervised pretraining images for a machine without the shared data (issue 13).

Why: a lent GPU machine receives the repository and at most 64 MiB beside it, not ../shared/data; the SimCLR
pretraining (`spinepath train pretrain`) reads every training set (spark_midsag, the chu_t2 / spineweb_vb /
ivd_t2 volumes' sagittal slices, with `--spider` the spider_midsag training + selection images at the discs
the product finds). The pack holds the same images and positions: each image cut to its structures plus a
margin that any view fits in, in 8 bits, xz-compressed; `spinepath train pretrain --pack FILE` reads it.
Validation images are never packed (collect_unlabelled leaves them out).

Usage: python scripts/pack_pretrain_images.py [--out .gpu/pretrain_images.npz.xz] [--spider] [--slice-step 2]
       [--margin-mm 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402
from spinepath.grading.pretraining import PACK_MARGIN_MM, collect_unlabelled, save_pretrain_pack  # noqa: E402


def main() -> int:
    """Write the pack and print what it holds."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".gpu/pretrain_images.npz.xz")
    ap.add_argument("--data-root", default=str(SHARED_EXAMPLES.parent))
    ap.add_argument("--spider", action="store_true", help="also the spider_midsag training + selection images")
    ap.add_argument("--slice-step", type=int, default=2, help="every N-th sagittal slice of the 3D volumes")
    ap.add_argument("--margin-mm", type=float, default=PACK_MARGIN_MM,
                    help="kept around the structures (64 fits the 64 mm SPIDER views; 84 mm views need 84)")
    args = ap.parse_args()
    images, structs = collect_unlabelled(args.data_root, args.slice_step, args.spider)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"pack": args.out, **save_pretrain_pack(args.out, images, structs, args.margin_mm)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
