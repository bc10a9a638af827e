import numpy as np
import pytest

from spinepath.detection.grouping import group_and_name
from spinepath.detection.predictor import SliceDetections


def _dets(n_slices: int, rows: list[float], s1: list[float], extra: list | None = None) -> list[SliceDetections]:
    out = []
    for _ in range(n_slices):
        boxes = [[r, 100 + 2 * i, r + 30, 140 + 2 * i] for i, r in enumerate(rows)] + (extra or [])
        n = len(boxes)
        out.append(
            SliceDetections(
                boxes=np.array(boxes, dtype=np.float32),
                scores=np.full(n, 0.9, dtype=np.float32),
                s1_scores=np.array(s1 + [0.0] * (n - len(s1)), dtype=np.float32),
                labels=np.zeros(n, dtype=np.int64),
            )
        )
    return out


def test_named_bottom_up_from_s1_and_sacral_segments_dropped():
    rows = [20, 60, 100, 140, 180, 220, 260]  # 7 bodies, the 6th is S1, the 7th a sacral segment
    s1 = [0, 0, 0, 0, 0, 0.9, 0.4]
    verts = group_and_name(_dets(4, rows, s1), (400, 400))
    assert [v.level for v in verts] == ["L1", "L2", "L3", "L4", "L5", "S1"]
    assert all(0 < v.name_confidence <= 1 for v in verts)
    assert verts[-1].name_confidence > 0.8
    assert [v.slices for v in verts] == [[0, 1, 2, 3]] * 6


def test_without_s1_the_lowest_is_l5_and_off_spine_boxes_are_dropped():
    rows = [0, 40, 80, 120]
    verts = group_and_name(_dets(3, rows, [0, 0, 0, 0.1], extra=[[300, 300, 330, 340]]), (400, 400))
    assert [v.level for v in verts] == ["L2", "L3", "L4", "L5"]
    assert verts[0].truncated and not verts[-1].truncated


def test_single_detections_on_one_slice_of_a_series_are_dropped_but_2d_input_kept():
    d = _dets(3, [20, 60, 100], [0, 0, 0])
    d[1].boxes = np.vstack([d[1].boxes, [[200, 100, 230, 140]]]).astype(np.float32)
    d[1].scores = np.append(d[1].scores, 0.9).astype(np.float32)
    d[1].s1_scores = np.append(d[1].s1_scores, 0.0).astype(np.float32)
    d[1].labels = np.append(d[1].labels, 0)
    assert len(group_and_name(d, (400, 400))) == 3
    assert len(group_and_name(_dets(1, [20, 60, 100], [0, 0, 0]), (400, 400))) == 3


def test_level_naming_evidence():
    """The highest of the lowest three passing the S1 threshold is S1 (S2 below looks alike); an S1-like
    vertebra above it sets transitional_suspected without renaming; no anchor keeps every confidence < 0.5."""
    from spinepath.detection.grouping import group_and_name_with_evidence
    from spinepath.detection.naming import calibrate, load_naming_rules

    rows = [20, 60, 100, 140, 180, 220, 260]
    verts, naming = group_and_name_with_evidence(_dets(4, rows, [0, 0, 0, 0, 0, 0.7, 0.95]), (400, 400))
    assert [v.level for v in verts][-2:] == ["L5", "S1"] and len(verts) == 6  # the S2 below is dropped
    assert naming.anchor == "S1" and naming.anchor_confidence == pytest.approx(0.7, abs=1e-6)
    assert not naming.transitional_suspected and naming.n_lumbar == 5 and naming.note == ""
    verts, naming = group_and_name_with_evidence(_dets(4, rows[:6], [0, 0, 0, 0, 0.4, 0.9]), (400, 400))
    assert naming.anchor == "S1" and naming.transitional_suspected and naming.n_lumbar == 4
    assert "transitional" in naming.note and [v.level for v in verts][-1] == "S1"
    assert all(v.name_confidence <= 0.5 for v in verts)
    verts, naming = group_and_name_with_evidence(_dets(4, rows[:5], [0] * 5), (400, 400))
    assert naming.anchor == "none" and "without a sacral anchor" in naming.note
    assert all(v.name_confidence < 0.5 for v in verts) and naming.confidence < 0.5
    d = naming.to_dict()
    assert set(d) >= {"anchor", "anchor_confidence", "n_lumbar", "transitional_suspected", "confidence"}
    # the fitted map is monotone and capped below 1
    rules = load_naming_rules()
    xs = np.linspace(0, 1, 21)
    ys = [calibrate(x, True, rules) for x in xs]
    assert all(b >= a for a, b in zip(ys, ys[1:])) and max(ys) < 1.0


def test_a_wide_sacrum_does_not_seed_the_chain():
    """The sacral segment below S1 is seen on more lateral slices than any lumbar body; the chain still grows
    from a lumbar body and keeps S1 (nearer the spacing of the column) rather than a fragment beside it."""
    from spinepath.core.results import Vertebra
    from spinepath.detection.grouping import spine_chain

    def track(row, slices, score, col=100.0):
        t = Vertebra()
        for k in slices:
            t.add(k, np.array([row, col, row + 32, col + 40], np.float32), score, 0.0)
        return t

    lumbar = [track(r, range(4, 16), 1.0) for r in (40, 80, 120, 160, 200)]
    s1 = track(244, range(4, 16), 0.8, col=109)
    fragment = track(254, range(4, 7), 0.6, col=115)  # a piece of S1 on three lateral slices
    sacrum = track(292, range(0, 17), 0.9, col=122)  # S2 region: wide, on every slice
    chain = spine_chain([*lumbar, s1, fragment, sacrum])
    assert s1 in chain and fragment not in chain and chain[0] is lumbar[0]


def _spine(heights: list[float], s1_last: float = 0.9) -> list[SliceDetections]:
    """One slice of bodies of the given heights, 8 px apart, the lowest S1-like."""
    boxes, r = [], 10.0
    for h in heights:
        boxes.append([r, 100, r + h, 140])
        r += h + 8
    n = len(boxes)
    return [SliceDetections(boxes=np.array(boxes, np.float32), scores=np.full(n, 0.9, np.float32),
                            s1_scores=np.array([0.0] * (n - 1) + [s1_last], np.float32),
                            labels=np.zeros(n, np.int64))]


def test_junction_features_by_hand():
    from spinepath.core.results import Vertebra
    from spinepath.detection.naming import JUNCTION_FEATURES, junction_features

    def v(r0, h, w):
        t = Vertebra()
        t.add(0, np.array([r0, 0, r0 + h, w], np.float32), 1.0, 0.0)
        return t

    f = junction_features(v(0, 20, 30), v(30, 25, 40), v(65, 25, 40))  # centres (10, 15), (42.5, 20), (77.5, 20)
    assert len(f) == len(JUNCTION_FEATURES)
    assert f == pytest.approx([0.8, 0.75, np.hypot(32.5, 5.0) / 35.0, 1.0])


def test_six_lumbar_type_vertebrae_are_suspected_not_renamed():
    """A vertebra named T12 taller than the L1 below it (a lumbar-shaped junction) sets transitional_suspected
    with six lumbar-type vertebrae and halves the name confidences; a shorter T12 (the thoracolumbar shape)
    does not; the names stay counted from S1 either way."""
    from spinepath.detection.grouping import group_and_name_with_evidence
    from spinepath.detection.naming import load_naming_rules

    assert "lumbar_type" in load_naming_rules()
    normal = [24, 28, 30, 31, 32, 32, 30]  # T12 (24 / 28 = 0.86 of L1), L1..L5, S1
    lumbar = [34, 32, 30, 31, 31, 31, 30]  # "T12" taller than "L1", as L1 is to L2 in a six-lumbar spine
    verts, naming = group_and_name_with_evidence(_spine(normal), (400, 400))
    assert [v.level for v in verts][0] == "T12" and naming.anchor == "S1"
    assert not naming.transitional_suspected and naming.n_lumbar == 5
    assert naming.evidence["lumbar_type_probability_T12"] < load_naming_rules()["lumbar_type"]["threshold"]
    verts6, naming6 = group_and_name_with_evidence(_spine(lumbar), (400, 400))
    assert [v.level for v in verts6] == [v.level for v in verts]
    assert naming6.transitional_suspected and naming6.n_lumbar == 6 and "6 lumbar-type" in naming6.note
    assert all(v.name_confidence <= 0.5 for v in verts6)
