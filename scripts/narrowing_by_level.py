"""Does the measured disc narrowing flag agree with SPIDER's narrowing grade, level by level? (issue 14).

On the spider_midsag T2 of the training + selection patients (by default; validation not read), the committed detector
names the vertebrae and the committed segmentation network measures the mid-sagittal image, as the product does
(T2 anchored on S1 only). Each measured disc's flag (middle height below 75 % of its measured adjacent discs'
mean, :func:`spinepath.core.results.narrowing_ratios`) is paired with SPIDER's narrowing label (> 0: narrowed)
of the same disc (index from the bottom). Prints JSON per level and per region (above T12-L1 / T12-L1 and below):
discs, labelled narrowed, flagged, flagged and narrowed (PPV), narrowed and flagged (sensitivity). Under
``listhesis`` the same for the measured slip's flag (``listhesis Meyerding ...``, from 3 mm against the body
below) against SPIDER's spondylolisthesis label, per level, with the flagged slips' offsets by size (there
``narrowed`` counts the discs SPIDER labels spondylolisthesis).

``--part validation`` reports the same on the validation patients (which chose nothing: the flags' rules were
set on the training + selection figures; this only measures them once on held-out patients).

Usage: python scripts/narrowing_by_level.py [--part fitting|validation] [--out FILE] [-q]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spinepath.core.geometry import series_from_slices  # noqa: E402
from spinepath.core.levels import DISC_LEVELS, disc_index_from_bottom  # noqa: E402
from spinepath.core.paths import SHARED_EXAMPLES  # noqa: E402
from spinepath.core.results import narrowing_ratios  # noqa: E402
from spinepath.core.thresholds import POSITIVE  # noqa: E402
from spinepath.data.spider import load_spider_midsag  # noqa: E402
from spinepath.data.split import spider_fitting_studies, split_cases  # noqa: E402
from spinepath.stages import detect_series, load_models, load_segmenter, segment  # noqa: E402


def counts(rows: list[tuple[str, str, int, bool, float]]) -> dict:
    """Discs, narrowed, flagged, PPV and sensitivity of ``(patient, level, label, flagged, ratio)`` rows."""
    n_pos = sum(r[2] for r in rows)
    n_flag = sum(r[3] for r in rows)
    tp = sum(r[2] and r[3] for r in rows)
    return {"discs": len(rows), "narrowed": n_pos, "flagged": n_flag, "flagged_narrowed": tp,
            "ppv": round(tp / n_flag, 3) if n_flag else None, "sensitivity": round(tp / n_pos, 3) if n_pos else None,
            "patients": len({r[0] for r in rows})}


def main() -> None:
    """Measure, pair, print JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--part", choices=("fitting", "validation"), default="fitting")
    args = ap.parse_args()
    detector, _ = load_models()
    segmenter = load_segmenter()
    root = SHARED_EXAMPLES.parent / "spider_midsag"
    if args.part == "fitting":
        studies = spider_fitting_studies(root)
    else:
        keep = set(split_cases(root, "validation"))
        studies = {s.patient: s for s in load_spider_midsag(root) if s.patient in keep}
    rows, slips = [], []
    for p in tqdm(sorted(studies), desc="measure", disable=args.quiet):
        st = studies[p]
        if "t2" not in st.sequences:
            continue
        res = detect_series(series_from_slices([st.load_image("t2")], st.spacing.get("t2") or (1.0, 1.0), 4.0),
                            detector)
        if res.naming is None or res.naming.anchor != "S1":
            continue
        segment(res, segmenter)
        seg = res.segmentation
        for lv, r in narrowing_ratios(seg.measurements["discs"]).items():
            label = st.discs_by_index.get(disc_index_from_bottom(lv), {}).get("narrowing")
            if label is not None:
                rows.append((p, lv, int(label > 0), bool(POSITIVE["narrowing_ratio"](r)), round(float(r), 3)))
        flags = seg.flags()["listhesis"]
        for lv, e in seg.measurements["listhesis"].items():
            label = st.discs_by_index.get(disc_index_from_bottom(lv), {}).get("spondylolisthesis")
            if label is not None:
                slips.append((p, lv, int(label > 0), bool(flags.get(lv)), round(float(e["offset_mm"]), 2)))
    lumbar = DISC_LEVELS[DISC_LEVELS.index("T12-L1"):]
    out = {"all": counts(rows),
           "above_T12-L1": counts([r for r in rows if r[1] not in lumbar]),
           "T12-L1_and_below": counts([r for r in rows if r[1] in lumbar]),
           "by_level": {lv: counts([r for r in rows if r[1] == lv]) for lv in DISC_LEVELS
                        if any(r[1] == lv for r in rows)}}
    flagged = [s for s in slips if s[3]]
    out["listhesis"] = {"all": counts(slips),
                        "by_level": {lv: counts([s for s in slips if s[1] == lv]) for lv in DISC_LEVELS
                                     if any(s[1] == lv for s in slips)},
                        "flagged_by_offset": {name: counts([s for s in flagged if lo <= s[4] < hi])
                                              for name, lo, hi in (("backward", -1e9, 0), ("forward_3_10mm", 0, 10),
                                                                   ("forward_10_20mm", 10, 20),
                                                                   ("forward_20mm_plus", 20, 1e9))},
                        "flagged_over_15mm_either_way": counts([s for s in flagged if abs(s[4]) > 15])}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps({**out, "rows": rows, "slips": slips}, indent=1))


if __name__ == "__main__":
    main()
