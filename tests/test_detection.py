import json

import numpy as np
from conftest import MODEL

from spinepath.data.datasets import iter_volume_slices, load_volume_index
from spinepath.detection.grouping import group_and_name
from spinepath.detection.network import DetectorConfig
from spinepath.detection.predictor import VertebraDetector, strict_suppression
from spinepath.detection.training import TrainConfig, train


def test_strict_suppression_drops_contained_and_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 9, 9], [0, 0, 10, 11], [20, 0, 30, 10]], dtype=np.float32)
    keep = strict_suppression(boxes, np.array([0.9, 0.8, 0.7, 0.6]), 0.2, 0.4)
    assert keep.tolist() == [0, 3]


def test_train_one_short_epoch_on_tiny_real_subset_and_predict(tmp_path, data_root):
    tc = TrainConfig(
        data_root=str(data_root),
        out_dir=str(tmp_path),
        epochs=1,
        batch_size=4,
        patch=128,
        slice_step=8,
        max_train_cases=1,
        quiet=True,
        num_threads=2,
    )
    res = train(tc, DetectorConfig(fpn_channels=32))
    hist = json.loads((tmp_path / "history.json").read_text())
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"]) and 0 <= hist[0]["mean_iou"] <= 1
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    model = VertebraDetector.load(res["best"])
    assert model.cfg.fpn_channels == 32
    # chosen on the selection split, then measured once on the validation split (which chose nothing)
    assert model.meta["selection_per_slice"]["mean_iou"] == hist[0]["mean_iou"]
    assert model.meta["val_per_slice"] == res["best_val_per_slice"] and 0 <= res["best_val_per_slice"]["mean_iou"] <= 1
    case = load_volume_index(data_root / "chu_t2")[0]
    s = next(iter_volume_slices(case, [38]))
    dets = model.predict([s.image], s.spacing)
    assert len(dets) == 1 and dets[0].boxes.shape[1] == 4


def test_default_model_finds_lumbar_vertebrae_on_a_real_slice(data_root):
    """The committed model on a validation case: every body >= 50% is hit with IoU >= 0.5 on the mid slice."""
    model = VertebraDetector.load(MODEL)
    case = next(c for c in load_volume_index(data_root / "chu_t2") if c.case == "04")
    s = next(iter_volume_slices(case, [38], min_fraction=0.5))
    dets = model.predict([s.image, s.image], s.spacing)
    from spinepath.core.boxes import box_iou

    iou = box_iou(dets[0].boxes, s.boxes)
    assert (iou.max(axis=0) >= 0.5).mean() >= 0.85
    verts = group_and_name(dets, s.image.shape)
    names = [v.level for v in verts]
    assert "L5" in names and names.index("L5") > names.index("L1")


def test_cpu_detector_runs_channels_last_with_the_same_boxes():
    """On the CPU the detector's network runs on channels-last weights (faster oneDNN convolutions, issue 15):
    the same boxes and scores as with the usual layout on a real example."""
    import torch
    from conftest import EXAMPLE

    from spinepath.io.dicom import load_study

    vol = load_study(EXAMPLE)
    det = VertebraDetector.load(MODEL)
    convs = [p for p in det.detector.network.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    fast = det.predict(list(vol.pixels), vol.spacing)
    det.detector.network.to(memory_format=torch.contiguous_format)
    usual = det.predict(list(vol.pixels), vol.spacing)
    assert [len(a.boxes) for a in fast] == [len(b.boxes) for b in usual] and sum(len(a.boxes) for a in fast) > 20
    for a, b in zip(fast, usual):
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
