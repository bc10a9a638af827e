"""SPIDER loaders, the derived body boxes and the one patient split shared by spider_seg and spider_midsag."""

import numpy as np
import pytest

from spinepath.data.datasets import dataset_kind
from spinepath.data.spider import (
    body_boxes,
    canal_front,
    graded_rows,
    load_spider_midsag,
    load_spider_seg,
    mirror_through_disc,
    spider_seg_slices,
)
from spinepath.data.split import load_split, split_cases, split_part


def test_spider_folders_are_told_apart(data_root):
    assert dataset_kind(data_root / "spider_seg") == "spider_seg"
    assert dataset_kind(data_root / "spider_midsag") == "spider_midsag"
    assert dataset_kind(data_root / "spark_midsag") == "spark"
    assert dataset_kind(data_root / "chu_t2") == "volumes"


def test_spider_midsag_loader(data_root):
    studies = load_spider_midsag(data_root / "spider_midsag")
    assert len(studies) == 163
    both = [s for s in studies if s.sequences == ["t1", "t2"]]
    assert len(both) == 141
    s = both[0]
    img = s.load_image("t2")
    assert img.dtype == np.float32 and img.ndim == 2
    assert [d["index_from_bottom"] for d in s.discs] == list(range(1, len(s.discs) + 1))
    assert 0.2 < s.spacing["t2"][0] < 1.5
    only = next(x for x in studies if len(x.sequences) == 1)
    missing = ({"t1", "t2"} - set(only.sequences)).pop()
    with pytest.raises(KeyError, match=f"no {missing} image"):
        only.load_image(missing)
    # a finding graded on a missing sequence is unknown, not its placeholder (Pfirrmann 1, Modic 0)
    t1_only = [x for x in studies if x.sequences == ["t1"]]
    t2_only = [x for x in studies if x.sequences == ["t2"]]
    assert len(t1_only) == 5 and len(t2_only) == 17
    assert all(d["pfirrmann"] is None and d["modic"] is None and d["narrowing"] in (0, 1)
               for x in t1_only for d in x.discs)
    assert all(d["modic"] is None and 1 <= d["pfirrmann"] <= 5 for x in t2_only for d in x.discs)
    assert all(d["modic"] in (0, 1, 2, 3) and 1 <= d["pfirrmann"] <= 5 for x in both for d in x.discs)
    assert graded_rows([{"pfirrmann": 3, "modic": 2}], ["t1", "t2"]) == [{"pfirrmann": 3, "modic": 2}]


def test_body_boxes_on_a_synthetic_slice():
    """Three bodies with posterior elements behind a canal, two discs: bodies cut at the canal, S1 mirrored."""
    m = np.zeros((200, 120), np.int16)
    m[:, 70:80] = 3  # canal
    for top in (20, 70, 120):
        m[top : top + 36, 20:60] = 1  # body
        m[top + 5 : top + 30, 85:110] = 1  # posterior elements
        m[top : top + 36, 60:70] = 1  # pedicle joining them at the canal's front
    m[56:70, 20:60] = 2
    m[156:170, 20:60] = 2  # lumbosacral disc: nothing labelled below it
    front = canal_front([m])
    b = body_boxes(m, front)
    assert b.levels == ["L3", "L4", "L5", "S1"]
    # cut at the canal's anterior wall (column 70), posterior elements excluded
    assert b.boxes[:3].tolist() == [[20, 20, 56, 70], [70, 20, 106, 70], [120, 20, 156, 70]]
    # S1: L5 (rows 120..155) mirrored through the disc plane (row 162.5): rows 170..205, clipped to the image
    assert b.s1_derived and b.boxes[3].tolist() == [170, 20, 200, 70]


def test_mirror_through_a_tilted_disc():
    ang = np.radians(30)
    u = np.array([np.sin(ang), np.cos(ang)])  # along the disc
    n = np.array([np.cos(ang), -np.sin(ang)])  # its normal
    disc = np.array([[100, 100]]) + np.outer(np.linspace(-20, 20, 41), u) + np.outer([0.0] * 41, n)
    disc = np.vstack([disc + k * n for k in (-2, 0, 2)])
    p = np.array([[100.0, 100.0]]) - 15 * n
    q = mirror_through_disc(p, disc)
    assert np.allclose(q, np.array([[100.0, 100.0]]) + 15 * n, atol=1e-6)


def test_spider_seg_slices_real(data_root):
    cases = load_spider_seg(data_root / "spider_seg")
    assert len(cases) == 31 and sum(len(c.slices) for c in cases) == 334
    slices = spider_seg_slices(cases[0])
    assert len(slices) == len(cases[0].slices)
    for s in slices:
        assert s.levels[-2:] == ["L5", "S1"]
        assert s.derived.tolist() == [False] * (len(s.levels) - 1) + [True]
        assert np.all(np.diff(s.boxes[:, 0]) > 0)  # top-down
        # every box is a body: its height is 0.5-2 times its width, 10-50 mm tall
        h = (s.boxes[:, 2] - s.boxes[:, 0]) * s.spacing[0]
        w = (s.boxes[:, 3] - s.boxes[:, 1]) * s.spacing[1]
        assert np.all((h > 10) & (h < 50) & (w > 15) & (w < 70)), (h, w)


def test_one_spider_split_across_both_folders(data_root):
    split = load_split()
    assert "spider" in split["validation"] and "spider" in split["selection"]
    val_seg = set(split_cases(data_root / "spider_seg", "validation"))
    val_mid = set(split_cases(data_root / "spider_midsag", "validation"))
    sel_seg = set(split_cases(data_root / "spider_seg", "selection"))
    assert val_seg and sel_seg and not val_seg & sel_seg
    for p in {c.patient for c in load_spider_seg(data_root / "spider_seg")}:
        assert split_part("spider_seg", p, p) == split_part("spider_midsag", p, p)
    assert val_seg <= set(split["validation"]["spider"]) and len(val_mid) >= 30


def test_disc_index_from_bottom_counts_as_the_labels():
    from spinepath.evaluation.spider import disc_index_from_bottom

    assert [disc_index_from_bottom(x) for x in ("L5-S1", "L4-L5", "L1-L2", "T12-L1", "T10-T11")] == [1, 2, 5, 6, 8]


def test_located_discs_on_real_spider_midsag(data_root, models):
    """The committed detector finds the lumbosacral disc and the discs above it on real SPIDER T2 images."""
    from spinepath.data.split import split_cases
    from spinepath.evaluation.spider import located_fraction

    cases = split_cases(data_root / "spider_midsag", "selection")[:4]
    r = located_fraction(data_root / "spider_midsag", models[0], cases, sequences=("t2",), progress=False)
    assert r["t2"]["n_images"] == 4 and r["t2"]["n_discs"] >= 20
    assert 0.5 <= r["t2"]["located_fraction"] <= 1.0 and r["t2"]["anchored_fraction"] >= 0.5
    assert all(0 <= x["located"] <= x["labelled"] for x in r["per_image"])


def test_evaluate_detection_on_spider_seg(data_root, models):
    """The contract JSON on one validation patient: bodies found and named from the lumbosacral disc."""
    from spinepath.evaluation.detection import evaluate_detection

    val = split_cases(data_root / "spider_seg", "validation")
    r = evaluate_detection(data_root / "spider_seg", models[0], cases=val[:1], progress=False)
    assert r["task"] == "detection" and r["n_cases"] == 1 and r["n_vertebrae"] >= 6
    assert r["mean_iou"] > 0.7 and r["recall_at_iou50"] > 0.9 and r["level_accuracy"] > 0.8
    assert r["s1_found"] == 1.0
    with pytest.raises(ValueError, match="no locations"):
        evaluate_detection(data_root / "spider_midsag", models[0])


def test_t1_pseudo_labels_from_the_t2_boxes(data_root, models):
    """T1 images of training patients get the T2's boxes and names where both sequences agree; never others."""
    from spinepath.data.spider import load_spider_midsag
    from spinepath.detection.training import t1_pseudo_slices

    studies = {s.patient: s for s in load_spider_midsag(data_root / "spider_midsag")}
    train = [p for p in studies if split_part("spider_midsag", p, p) == "train"][:8]
    out = t1_pseudo_slices(data_root, models[0], cases=train)
    assert 1 <= len(out) <= len(train)
    for s in out:
        assert s.case in train and s.dataset == "spider_midsag_t1"
        np.testing.assert_array_equal(s.image, studies[s.case].load_image("t1"))
        assert s.levels[-1] == "S1" and len(s.boxes) == len(s.levels) >= 4
        assert s.span[1] == s.image.shape[0]  # the sacrum below S1 is background
    val = split_cases(data_root / "spider_midsag", "validation")[:3]
    assert t1_pseudo_slices(data_root, models[0], cases=val) == []  # validation patients are never used
