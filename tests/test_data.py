
import numpy as np

from spinepath.data.datasets import (
    clinical_slice_indices,
    dataset_kind,
    iter_volume_slices,
    load_spark,
    load_volume_index,
    spark_boxes,
    spark_slice,
)
from spinepath.data.split import is_validation, load_split


def test_volume_loaders_every_3d_folder(data_root):
    for ds, structure, n_cases in (
        ("chu_t2", "vertebral_body", 12),
        ("spineweb_vb", "vertebral_body", 9),
        ("ivd_t2", "disc", 4),
    ):
        assert dataset_kind(data_root / ds) == "volumes"
        cases = load_volume_index(data_root / ds)
        assert len(cases) == n_cases
        image, mask, spacing = cases[0].load()
        assert image.shape == mask.shape and image.dtype == np.float32
        assert spacing == (1.0, 1.0, 1.0)
        assert cases[0].structure == structure
        assert set(np.unique(mask)) == set(range(cases[0].n_labels + 1))


def test_boxes_from_masks_match_mask_extent(data_root):
    case = load_volume_index(data_root / "chu_t2")[0]
    _, mask, _ = case.load()
    k = int(np.argmax((mask > 0).sum((0, 1))))
    s = next(iter_volume_slices(case, [k]))
    assert s.levels == ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    for box, lv in zip(s.boxes, s.levels):
        rr, cc = np.nonzero(mask[:, :, k] == s.levels.index(lv) + 1)
        assert box.tolist() == [rr.min(), cc.min(), rr.max() + 1, cc.max() + 1]
    # boxes are ordered top-down and do not overlap much
    assert np.all(np.diff(s.boxes[:, 0]) > 0)
    assert np.all((s.area_fraction > 0) & (s.area_fraction <= 1))


def test_spineweb_inferred_levels_end_at_s1(data_root):
    case = load_volume_index(data_root / "spineweb_vb")[0]
    assert case.level_names() == [None] * case.n_labels
    assert case.inferred_levels()[-1] == "S1"


def test_spark_loader_and_derived_boxes_contain_centres(data_root):
    cases = load_spark(data_root / "spark_midsag")
    assert len(cases) == 146
    c = cases[0]
    boxes, levels, centres = spark_boxes(c)
    assert levels == ["L1", "L2", "L3", "L4", "L5"]
    for b, (r, col) in zip(boxes, centres):
        assert b[0] < r < b[2] and b[1] < col < b[3]
    s = spark_slice(c)
    assert s.image.shape == tuple(c.size_hw)
    assert 0.3 < s.spacing[0] < 3.0


def test_clinical_slices_match_dicom_examples():
    assert clinical_slice_indices(76)[:3] == [0, 4, 8]
    assert clinical_slice_indices(77)[:3] == [0, 4, 8]
    assert clinical_slice_indices(78)[:2] == [1, 5]
    assert len(clinical_slice_indices(76)) == 19


def test_split_never_mixes_patients(data_root):
    split = load_split()
    for ds in ("chu_t2", "spineweb_vb", "ivd_t2"):
        by_patient: dict[str, set[bool]] = {}
        for c in load_volume_index(data_root / ds):
            by_patient.setdefault(c.patient, set()).add(is_validation(ds, c.case, c.patient, split))
        assert all(len(v) == 1 for v in by_patient.values()), ds
        assert any(True in v for v in by_patient.values()) and any(False in v for v in by_patient.values())
    # the example DICOM cases are validation cases
    assert {"02", "04"} <= set(split["validation"]["chu_t2"])


def test_spark_s1_box_below_l5_in_every_study(data_root):
    """The shared data names every study anatomically (its README), so every study gets its S1 box below L5."""
    from spinepath.data.datasets import spark_s1_box

    n = 0
    for c in load_spark(data_root / "spark_midsag"):
        y = {p["level"]: p["xy"][1] for p in c.points if p["kind"] == "vertebra"}
        if {"L1", "L5"} <= set(y):
            assert y["L1"] < y["L5"], c.case  # names run top-down in the image
        s1 = spark_s1_box(c)
        if s1 is not None:
            n += 1
            assert s1[0] > y["L5"], c.case  # below L5
    assert n >= 140


def test_selection_split_is_carved_out_of_training_patients(data_root):
    """Selection (model choice in training) and validation (reporting only) share no patient, by patient."""
    from spinepath.data.split import split_cases, split_part
    from spinepath.detection.training import collect_slices

    for ds in ("chu_t2", "spineweb_vb", "spark_midsag"):
        sel, val = set(split_cases(data_root / ds, "selection")), set(split_cases(data_root / ds, "validation"))
        assert sel and val and not sel & val
        if ds != "spark_midsag":
            patients = {c.case: c.patient for c in load_volume_index(data_root / ds)}
            assert not {patients[c] for c in sel} & {patients[c] for c in val}
    assert split_part("spineweb_vb", "11", "10") == "validation" and split_part("chu_t2", "06") == "selection"
    train = {(s.dataset, s.case) for s in collect_slices(data_root, "train", slice_step=16, max_cases=2)}
    chosen = {(s.dataset, s.case) for s in collect_slices(data_root, "selection", max_cases=2)}
    assert chosen and not train & chosen
