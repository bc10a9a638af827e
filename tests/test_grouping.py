import numpy as np

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
