"""The MONAI Label app (label/) over HTTP: a real server on loopback with studies built from the DICOM examples.

The server runs in its own environment (.venv-label: monailabel 0.8.5, pydicom 2.4, numpy 1.26); this test
process talks to it with plain HTTP and checks the results with the core package.
"""

from __future__ import annotations

import email
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from conftest import REPO, rician
from servers import ServerError, monailabel_server

from spinepath.core.labels import load_label_map
from spinepath.core.paths import resolve_model_path
from spinepath.detection.predictor import VertebraDetector
from spinepath.io.dicom import load_study
from spinepath.io.volumes import image_from_volume, labels_on_volume, write_image
from spinepath.labeling.corrections import slices_from_label_file
from spinepath.labeling.labelmap import render_labels
from spinepath.stages import detect_series

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
EXAMPLES = ("chu_t2_02", "chu_t2_04")
LOW_SNR = "chu_t2_04_lowsnr"
TIMEOUT = 300


def _noisy(volume, seed: int = 0) -> np.ndarray:
    """The volume at low SNR (Rician noise at 25% of the 99th intensity percentile)."""
    return rician(volume.pixels, 0.25, np.random.default_rng(seed)).astype(np.float32)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NIfTI studies from the real DICOM examples (geometry kept), plus a low-SNR copy of one."""
    root = tmp_path_factory.mktemp("studies")
    for case in EXAMPLES:
        write_image(image_from_volume(load_study(DATA / "dicom_examples" / case)), root / f"{case}.nii.gz")
    v = load_study(DATA / "dicom_examples" / "chu_t2_04")
    write_image(image_from_volume(v, _noisy(v)), root / f"{LOW_SNR}.nii.gz")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("label-model")


@pytest.fixture(scope="module")
def server(studies: Path, model_dir: Path) -> str:
    conf = {"round_max_train_cases": "1", "round_val_max_cases": "1", "round_epochs": "1", "num_threads": "2",
            "seg_round_epochs": "1"}
    try:
        with monailabel_server(str(studies), model_dir, conf) as url:
            yield url
    except ServerError as exc:
        pytest.fail(str(exc))


def _infer(server: str, image: str, task: str = "vertebrae") -> tuple[dict, sitk.Image]:
    """``/infer/<task>`` with ``output=all``: (result parameters, label image)."""
    r = requests.post(f"{server}/infer/{task}", params={"image": image, "output": "all"}, timeout=TIMEOUT)
    r.raise_for_status()
    msg = email.message_from_bytes(b"Content-Type: " + r.headers["content-type"].encode() + b"\r\n\r\n" + r.content)
    params, label = None, None
    for part in msg.get_payload():
        name = part.get_param("name", header="content-disposition")
        if name == "params":
            params = json.loads(part.get_payload(decode=True))
        elif name == "image":
            label = part.get_payload(decode=True)
    assert params is not None and label is not None, "multipart answer without params or image"
    path = Path(f"/tmp/spinepath-label-{threading.get_ident()}-{time.time_ns()}.nii.gz")
    path.write_bytes(label)
    try:
        return params, sitk.ReadImage(str(path))
    finally:
        path.unlink()


def _put_label(server: str, image: str, label: sitk.Image, tag: str = "final", tmp: Path | None = None) -> dict:
    path = (tmp or Path("/tmp")) / f"put-{image}-{tag}-{time.time_ns()}.nii.gz"
    sitk.WriteImage(label, str(path))
    try:
        with open(path, "rb") as fh:
            r = requests.put(f"{server}/datastore/label", params={"image": image, "tag": tag},
                             files={"label": (path.name, fh, "application/gzip")}, data={"params": "{}"},
                             timeout=TIMEOUT)
        r.raise_for_status()
        return r.json()
    finally:
        path.unlink(missing_ok=True)


def _wait_train(server: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        st = requests.get(f"{server}/train/", timeout=30).json()
        if st.get("status") not in ("SUBMITTED", "RUNNING", "QUEUED"):
            return st
        time.sleep(2)
    raise AssertionError("training round did not finish")


# --------------------------------------------------------------------------------------------------- tests
def test_info(server: str) -> None:
    info = requests.get(f"{server}/info/", timeout=30).json()
    labels = {n: lab.value for n, lab in load_label_map().items()}
    structures = {n: lab.value for n, lab in load_label_map(structures=True).items()}
    assert info["name"] == "spinepath" and "NOT FOR DIAGNOSTIC USE" in info["description"]
    # the bundled OHIF panel reads the top-level labels as a list of names (issue 16); models keep the map
    assert info["labels"] == sorted(labels, key=labels.get) and isinstance(info["labels"], list)
    assert set(info["models"]) == {"vertebrae", "spine_structures"}
    assert info["models"]["spine_structures"]["labels"] == structures
    assert structures["L3"] == labels["L3"] and {"L3-L4", "spinal canal"} <= set(structures)
    assert info["models"]["spine_structures"]["config"]["label_colors"]["spinal canal"] == list(
        load_label_map(structures=True)["spinal canal"].color)
    model = info["models"]["vertebrae"]
    assert model["type"] == "segmentation" and model["dimension"] == 3 and model["labels"] == labels
    assert model["config"]["label_colors"]["L3"] == list(load_label_map()["L3"].color)
    assert set(info["strategies"]) == {"uncertainty", "random", "first"}
    assert {"vertebrae", "spine_structures"} <= set(info["trainers"])
    assert info["train_stats"]["vertebrae"]["served"]["round"] == 0
    assert info["train_stats"]["spine_structures"]["served"]["round"] == 0
    assert info["datastore"]["total"] == 3


def test_infer_vertebrae_label_map(server: str, studies: Path) -> None:
    params, label = _infer(server, "chu_t2_02")
    image = sitk.ReadImage(str(studies / "chu_t2_02.nii.gz"))
    assert label.GetSize() == image.GetSize()
    assert np.allclose(label.GetOrigin(), image.GetOrigin()) and np.allclose(label.GetDirection(), image.GetDirection())
    lab_map = load_label_map()
    assert params["label_names"] == {n: lab.value for n, lab in lab_map.items()}
    assert "NOT FOR DIAGNOSTIC USE" in params["disclaimer"]
    assert params["model"] == {"detector_round": 0, "graded": True, "degeneration": True}
    # the same levels as the core pipeline on the DICOM series, at the same places
    volume = load_study(DATA / "dicom_examples" / "chu_t2_02")
    got = labels_on_volume(label, volume)
    ref, ref_levels = render_labels(detect_series(volume, VertebraDetector.load(resolve_model_path())))
    assert params["levels"] == ref_levels
    assert {"L1", "L2", "L3", "L4", "L5", "S1"} <= set(ref_levels)
    assert sorted(int(v) for v in np.unique(got) if v) == sorted(lab_map[lv].value for lv in ref_levels)
    for lv in ref_levels:
        a, b = got == lab_map[lv].value, ref == lab_map[lv].value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95, lv
    # top-down order on the display grid: each level's centre is below the one above
    rows = [np.nonzero(got == lab_map[lv].value)[1].mean() for lv in ref_levels]
    assert rows == sorted(rows)
    # filled boxes: on every slice a level's pixels are its bounding rectangle
    for lv in ("L1", "L3", "S1"):
        for k in range(got.shape[0]):
            rr, cc = np.nonzero(got[k] == lab_map[lv].value)
            if rr.size:
                assert rr.size >= 0.9 * (np.ptp(rr) + 1) * (np.ptp(cc) + 1)
    by_level = {v["level"]: v for v in params["vertebrae"]}
    assert by_level["L3"]["pathology"]["label"] in ("healthy", "pathological")
    # the degenerative grades per disc, as in the JSON output, with each disc's review flag
    discs = {d["level"]: d for d in params["discs"]}
    assert {"L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"} <= set(discs)
    for d in discs.values():
        assert 1 <= d["pfirrmann"]["grade"] <= 5 and d["modic"]["label"] in ("present", "absent")
        assert d["herniation"]["label"] in ("present", "absent") and isinstance(d["needs_review"], bool)
    assert params["degeneration_model"]["sequences"] == ["t2"]


def test_infer_raw_nrrd_as_ohif_asks(server: str, studies: Path, tmp_path: Path) -> None:
    """OHIF's panel asks for uncompressed uint8 NRRD (it copies the raw voxels into its label map)."""
    body = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}
    # sent as OHIF sends them: a "params" form field
    r = requests.post(f"{server}/infer/vertebrae", params={"image": "chu_t2_02", "output": "image"},
                      data={"params": json.dumps(body)}, timeout=TIMEOUT)
    r.raise_for_status()
    header = r.content.split(b"\n\n", 1)[0].decode()
    assert header.startswith("NRRD") and "encoding: raw" in header and "type: unsigned char" in header, header
    (tmp_path / "label.nrrd").write_bytes(r.content)
    nrrd = sitk.ReadImage(str(tmp_path / "label.nrrd"))
    _, nifti = _infer(server, "chu_t2_02")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nrrd), sitk.GetArrayFromImage(nifti))
    bad = requests.post(f"{server}/infer/vertebrae", params={"image": "chu_t2_02", "output": "image"},
                        data={"params": json.dumps({"result_extension": ".exe"})}, timeout=TIMEOUT)
    assert bad.status_code == 400 and "result_extension" in bad.text, bad.text


def test_infer_unknown_image_is_an_error(server: str) -> None:
    """An id the datastore does not hold is a 404 naming it, and so is a path on the server (not read).

    Found 2026-12-06: MONAI Label turned an unknown id into "" and the task read the server's working directory
    as a study (a 422 about a localizer series), and it reads any existing server path given as an id.
    """
    for image in ("no_such_study", str(REPO / "label"), "/etc"):
        for task in ("vertebrae", "spine_structures"):
            r = requests.post(f"{server}/infer/{task}", params={"image": image, "output": "json"}, timeout=60)
            assert r.status_code == 404 and image in r.json()["detail"], (image, task, r.status_code, r.text)


def test_active_learning(server: str) -> None:
    unc = requests.post(f"{server}/activelearning/uncertainty", json={}, timeout=TIMEOUT).json()
    assert set(unc["scores"]) == {*EXAMPLES, LOW_SNR}
    assert unc["id"] == max(unc["scores"], key=unc["scores"].get)
    assert unc["id"] == LOW_SNR, unc["scores"]  # the noisy acquisition is the least certain
    assert 0 <= unc["uncertainty"]["score"] <= 1
    first = requests.post(f"{server}/activelearning/first", json={}, timeout=60).json()
    assert first["id"] == "chu_t2_02"
    rand = requests.post(f"{server}/activelearning/random", json={}, timeout=60).json()
    assert rand["id"] in {*EXAMPLES, LOW_SNR}


def test_correction_feeds_the_next_round_and_promotion(server: str, studies: Path, model_dir: Path,
                                                       tmp_path: Path) -> None:
    lab_map = load_label_map()
    _, label = _infer(server, "chu_t2_02")
    arr = sitk.GetArrayFromImage(label)
    present = [lv for lv in lab_map if np.any(arr == lab_map[lv].value)]
    # the annotator deletes the top box, renames the next one, moves L3 down by 3 rows and adds a missed T1
    deleted, renamed = present[0], present[1]
    arr[arr == lab_map[deleted].value] = 0
    arr[arr == lab_map[renamed].value] = lab_map["T2"].value
    l3 = arr == lab_map["L3"].value
    arr[l3] = 0
    arr[np.roll(l3, 3, axis=1) & (arr == 0)] = lab_map["L3"].value
    arr[9, 2:12, 20:40] = lab_map["T1"].value
    fixed = sitk.GetImageFromArray(arr)
    fixed.CopyInformation(label)
    assert _put_label(server, "chu_t2_02", fixed, tmp=tmp_path) == {"image": "chu_t2_02", "label": "chu_t2_02"}
    ds = requests.get(f"{server}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "final" in ds["objects"]["chu_t2_02"]["labels"]
    # what the trainer reads back from the datastore: the corrected boxes and names
    r = requests.get(f"{server}/datastore/label", params={"label": "chu_t2_02", "tag": "final"}, timeout=60)
    (tmp_path / "saved.nii.gz").write_bytes(r.content)
    slices, _ = slices_from_label_file(studies / "chu_t2_02.nii.gz", tmp_path / "saved.nii.gz")
    assert "T1" in slices[9].levels and slices[9].boxes[slices[9].levels.index("T1")].tolist() == [2, 20, 12, 40]
    assert not any(deleted in s.levels for s in slices) and any("T2" in s.levels for s in slices)
    k = int(np.argmax(l3.sum(axis=(1, 2))))
    rows = np.nonzero(l3[k].any(axis=1))[0]
    b = slices[k].boxes[slices[k].levels.index("L3")]
    assert b[0] == rows.min() + 3 and b[2] <= rows.max() + 4
    # a labelled study is no longer proposed
    unc = requests.post(f"{server}/activelearning/uncertainty", json={}, timeout=TIMEOUT).json()
    assert "chu_t2_02" not in unc["scores"]

    # round 1 (asynchronous, as from OHIF): learning rate 0 -> same weights -> measures equal -> promoted
    r = requests.post(f"{server}/train/vertebrae", json={"epochs": 1, "lr": 0.0}, timeout=60)
    assert r.status_code == 200, r.text
    st = _wait_train(server)
    assert st["status"] == "DONE", st
    store = model_dir / "vertebrae"
    hist = json.loads((store / "rounds" / "history.json").read_text())
    rec = hist[-1]
    assert rec["round"] == 1 and rec["promoted"] is True
    assert rec["metrics"]["mean_iou"] == pytest.approx(rec["served_metrics"]["mean_iou"], abs=1e-6)
    # promotion measured on the selection split; the validation split is reported for both models
    assert rec["selection"]["metric"] == "mean_iou" and rec["selection"]["n_slices"] > 0
    val, served_val = rec["validation_metrics"], rec["served_validation_metrics"]
    assert val["mean_iou"] == pytest.approx(served_val["mean_iou"], abs=1e-6)
    (corr,) = rec["training_data"]["corrections"]
    expected_levels = [lv for lv in lab_map if np.any(arr == lab_map[lv].value)]
    assert corr["image"] == "chu_t2_02" and corr["levels"] == expected_levels
    assert deleted not in corr["levels"] and {"T1", "T2"} <= set(corr["levels"])
    assert corr["boxes"] == sum(int(np.any(arr[k] == v)) for k in range(arr.shape[0]) for v in np.unique(arr) if v)
    served = json.loads((store / "served.json").read_text())
    assert served["round"] == 1 and (store / served["model"]).is_file()
    params, _ = _infer(server, "chu_t2_04")
    assert params["model"]["detector_round"] == 1

    # round 2: a destructive learning rate -> measures worse -> the served model stays round 1
    r = requests.post(f"{server}/train/vertebrae", params={"run_sync": "true"}, json={"epochs": 1, "lr": 0.02},
                      timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    hist = json.loads((store / "rounds" / "history.json").read_text())
    assert hist[-1]["round"] == 2 and hist[-1]["promoted"] is False
    assert hist[-1]["metrics"]["mean_iou"] < hist[-1]["served_metrics"]["mean_iou"]
    assert json.loads((store / "served.json").read_text())["round"] == 1
    assert (store / "rounds" / "round-0002" / "model.pt").is_file()  # versioned, kept, not served
    assert (store / "rounds" / "history.png").stat().st_size > 1000
    stats = requests.get(f"{server}/info/", timeout=30).json()["train_stats"]["vertebrae"]
    assert stats["served"]["round"] == 1 and stats["promoted"] == [1]


def test_infer_spine_structures_named_masks(server: str, studies: Path) -> None:
    """Bodies, discs and canal as one label map on the study's grid, named as the core pipeline names them,
    with the key slice's measurements in the result."""
    params, label = _infer(server, "chu_t2_02", "spine_structures")
    image = sitk.ReadImage(str(studies / "chu_t2_02.nii.gz"))
    assert label.GetSize() == image.GetSize() and np.allclose(label.GetOrigin(), image.GetOrigin())
    lab = load_label_map(structures=True)
    assert params["label_names"] == {n: x.value for n, x in lab.items()} and params["model"]["segmentation_round"] == 0
    volume = load_study(DATA / "dicom_examples" / "chu_t2_02")
    got = labels_on_volume(label, volume)
    for name in ("L1", "L3", "L5", "L2-L3", "L4-L5", "spinal canal"):
        assert (got == lab[name].value).sum() > 100, name
    # bodies top-down, each disc between its two bodies (display grid rows)
    rows = {n: np.nonzero(got == lab[n].value)[1].mean() for n in ("L2", "L2-L3", "L3", "L3-L4", "L4")}
    assert list(rows) == sorted(rows, key=rows.get)
    seg, meas = params["segmentation"], params["measurements"]
    assert len(seg["slices"]) == volume.pixels.shape[0]  # every slice, for the annotator
    assert 18 < meas["vertebrae"]["L3"]["middle"]["mm"] < 40 and "L3-L4" in meas["discs"]
    assert set(meas["review"]["discs"]) == set(meas["discs"])  # each measured disc with its review
    assert all(set(r) == {"needs_review", "review_reasons"} for r in meas["review"]["discs"].values())


def test_structure_correction_feeds_a_segmentation_round(server: str, studies: Path, model_dir: Path,
                                                         tmp_path: Path) -> None:
    """An annotator's corrected masks train the segmentation network in a round; promoted only when the mean
    Dice on the fixed selection slices is not worse; a vertebra-box label is not used as a mask reference."""
    lab = load_label_map(structures=True)
    _, label = _infer(server, "chu_t2_04", "spine_structures")
    arr = sitk.GetArrayFromImage(label)
    arr[arr == lab["L4-L5"].value] = 0  # the annotator removes a disc drawn wrongly, paints a canal stretch
    arr[9, 150:170, 200:210] = lab["spinal canal"].value
    fixed = sitk.GetImageFromArray(arr)
    fixed.CopyInformation(label)
    _put_label(server, "chu_t2_04", fixed, tmp=tmp_path)
    _, boxes = _infer(server, LOW_SNR)  # a study labelled in the vertebrae task: filled boxes, no disc
    _put_label(server, LOW_SNR, boxes, tmp=tmp_path)
    r = requests.post(f"{server}/train/spine_structures", params={"run_sync": "true"}, json={"epochs": 1, "lr": 0.0},
                      timeout=3 * TIMEOUT)  # a round scores the selection slices: minutes on a busy 2-core machine
    assert r.status_code == 200, r.text
    store = model_dir / "spine_structures"
    rec = json.loads((store / "rounds" / "history.json").read_text())[-1]
    assert rec["round"] == 1 and rec["promoted"] is True and rec["selection"]["metric"] == "mean_dice"
    assert rec["metrics"]["mean_dice"] == pytest.approx(rec["served_metrics"]["mean_dice"], abs=1e-6)
    assert rec["selection"]["n_slices"] > 0 and set(rec["validation_metrics"]) >= {"mean_dice", "disc"}
    corr = {c["image"]: c for c in rec["training_data"]["corrections"]}
    assert corr["chu_t2_04"]["slices"] > 0
    assert "vertebra-box label" in corr[LOW_SNR]["skipped"]  # the vertebrae task's saved boxes
    assert json.loads((store / "served.json").read_text())["round"] == 1
    params, _ = _infer(server, "chu_t2_02", "spine_structures")
    assert params["model"]["segmentation_round"] == 1
    r = requests.post(f"{server}/train/spine_structures", params={"run_sync": "true"},
                      json={"epochs": 1, "lr": 0.05}, timeout=3 * TIMEOUT)  # as the first round
    assert r.status_code == 200, r.text
    rec = json.loads((store / "rounds" / "history.json").read_text())[-1]
    assert rec["round"] == 2 and rec["promoted"] is False
    assert rec["metrics"]["mean_dice"] < rec["served_metrics"]["mean_dice"]
    assert json.loads((store / "served.json").read_text())["round"] == 1
    bad = requests.post(f"{server}/train/spine_structures", params={"run_sync": "true"},
                        json={"metric": "mean_iou"}, timeout=TIMEOUT)
    assert bad.status_code >= 400


def test_concurrent_label_saves_lose_nothing(server: str, studies: Path, tmp_path: Path) -> None:
    images = [*EXAMPLES, LOW_SNR]
    tags = ["final", "annotator_a", "annotator_b"]
    sent: dict[tuple[str, str], np.ndarray] = {}
    jobs = []
    for i, image in enumerate(images):
        ref = sitk.ReadImage(str(studies / f"{image}.nii.gz"))
        for j, tag in enumerate(tags):
            a = np.zeros(sitk.GetArrayFromImage(ref).shape, np.uint8)
            a[5 + i, 100:140, 150 + 10 * j:190 + 10 * j] = 13 + j  # a distinct box per (image, tag)
            img = sitk.GetImageFromArray(a)
            img.CopyInformation(ref)
            sent[image, tag] = a
            jobs.append((image, tag, img))
    errors: list[BaseException] = []

    def save(image: str, tag: str, img: sitk.Image) -> None:
        try:
            _put_label(server, image, img, tag, tmp_path)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=save, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors, errors
    ds = requests.get(f"{server}/datastore/", params={"output": "all"}, timeout=30).json()
    for (image, tag), a in sent.items():
        assert tag in ds["objects"][image]["labels"], (image, tag)
        r = requests.get(f"{server}/datastore/label", params={"label": image, "tag": tag}, timeout=60)
        r.raise_for_status()
        p = tmp_path / f"got-{image}-{tag}.nii.gz"
        p.write_bytes(r.content)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(p))), a), (image, tag)
