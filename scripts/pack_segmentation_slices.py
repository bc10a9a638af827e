"""Pack the segmentation training and selection slices for a machine without the shared data (issue 14).

Why: a lent GPU machine receives the repository and at most 64 MiB beside it, not ../shared/data (150 MB of
segmentation sources). The pack holds the slices already on the 0.75 mm grid (8-bit images, group-index
masks), xz-compressed; `spinepath train segmentation --pack FILE` trains from it. The validation part is not
packed (it chooses nothing; it is evaluated here, on the source pixels).

Usage: python scripts/pack_segmentation_slices.py [--out .gpu/seg_slices.npz.xz] [--step 4] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402
from spinepath.segmentation.data import save_slice_pack  # noqa: E402
from spinepath.segmentation.training import load_slices  # noqa: E402


def main() -> int:
    """Write the pack and print what it holds."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".gpu/seg_slices.npz.xz")
    ap.add_argument("--step", type=int, default=4, help="every N-th lateral slice of the 3D training volumes")
    ap.add_argument("--data-root", default=str(SHARED_EXAMPLES.parent))
    args = ap.parse_args()
    parts = {"train": load_slices(args.data_root, "train", args.step),
             "selection": load_slices(args.data_root, "selection", 4)}
    save_slice_pack(args.out, parts)
    print(json.dumps({"pack": args.out, "bytes": Path(args.out).stat().st_size, "step": args.step,
                      **{p: dict(Counter(s.source for s in sl)) for p, sl in parts.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
