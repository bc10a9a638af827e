"""MONAI Label with Orthanc as its DICOMweb datastore: the annotator's flow in OHIF, infer and SEG round trip.

Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) holds the real example study; the spinepath MONAI Label
app serves it; OHIF (bundled with MONAI Label, patched by ``label/ohif_patch.py``) is driven in Debian's
headless ``chromium`` with selenium. ``SPINEPATH_SCREENSHOTS=DIR`` also writes the flow's screenshots there
(small PNGs: the README's annotator guide shows them).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from conftest import rician
from PIL import Image
from pydicom.uid import generate_uid
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from servers import DICOMWEB_ROOT, ServerError, monailabel_server, orthanc_url  # noqa: F401

from spinepath.core.labels import load_label_map
from spinepath.core.paths import resolve_model_path
from spinepath.detection.predictor import VertebraDetector
from spinepath.io.dicom import load_study
from spinepath.io.pacs import fetch_study, find_series, store_files
from spinepath.io.volumes import labels_on_volume
from spinepath.labeling.labelmap import labels_from_seg, render_labels
from spinepath.labeling.structures import structure_label_map
from spinepath.outputs.seg import build_level_seg
from spinepath.stages import detect_series

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dicom_examples" / "chu_t2_04"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TIMEOUT = 300


@pytest.fixture(scope="module")
def source(orthanc_url: str) -> pydicom.Dataset:  # noqa: F811  (the imported fixture)
    files = sorted(EXAMPLE.glob("*.dcm"))
    store_files(orthanc_url + DICOMWEB_ROOT, files)
    return pydicom.dcmread(files[0], stop_before_pixels=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model")


@pytest.fixture(scope="module")
def server(orthanc_url: str, source: pydicom.Dataset, model_dir: Path,  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = tmp_path_factory.mktemp("dicomweb-cache")
    os.environ["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(cache)  # read by the server started below
    # MONAI Label lists the PACS' series once per this many seconds (default 2 h): the tests add studies
    os.environ["MONAI_LABEL_DICOMWEB_CACHE_EXPIRY"] = "1"
    # small rounds: "Update Model" in OHIF trains with the server's defaults
    conf = {"round_val_max_cases": "1", "round_max_train_cases": "1", "round_epochs": "1", "al_max_new": "8"}
    try:
        with monailabel_server(orthanc_url + DICOMWEB_ROOT, model_dir, conf) as url:
            yield url
    except ServerError as exc:
        pytest.fail(str(exc))
    finally:
        os.environ.pop("MONAI_LABEL_DICOMWEB_CACHE_PATH", None)
        os.environ.pop("MONAI_LABEL_DICOMWEB_CACHE_EXPIRY", None)


@pytest.fixture(scope="module")
def browser():
    for p in (CHROMIUM, CHROMEDRIVER):
        if not p.is_file():
            pytest.fail(f"{p} not found: run scripts/setup_system.sh (Debian chromium, chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--no-first-run", "--window-size=1600,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


# Browser console messages that are not errors of the product: (text in the message, why it is allowed)
CONSOLE_ALLOWED = (
    ("fonts.googleapis.com", "OHIF's web fonts: no internet on CI machines"),
    ("/assets/android-chrome", "the manifest icon, which monailabel 0.8.5 serves outside /ohif/ (404)"),
    ("/train/?check_if_running=true", "MONAI Label answers 404 while no round runs (its API, which 3D Slicer's "
                                      "client relies on); the panel reads it as 'not running'"),
)


def console_errors(driver) -> list[str]:
    """Errors in the browser console since the last call: SEVERE entries and React error boundaries."""
    out = []
    for e in driver.get_log("browser"):
        msg = e["message"]
        if any(allowed in msg for allowed, _ in CONSOLE_ALLOWED):
            continue
        if e["level"] == "SEVERE" or "Error Boundary" in msg:
            out.append(msg[:500])
    return out


def test_ohif_renders_and_lists_the_study(server: str, source: pydicom.Dataset, browser, tmp_path: Path) -> None:
    browser.get(f"{server}/ohif/")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and str(source.PatientID) not in browser.page_source:
        time.sleep(0.5)
    browser.save_screenshot(str(tmp_path / "ohif.png"))
    page = browser.page_source
    assert "Study List" in page, "OHIF did not render its study list"
    assert str(source.PatientID) in page, "the example study is not in OHIF's study list"
    assert not console_errors(browser)


def _copy_with_new_uids(src: Path, dst: Path, noise: float = 0.0, seed: int = 0) -> list[Path]:
    """The example series as a new study (new study/series/instance/frame-of-reference UIDs), optionally noisier.

    ``noise``: Rician noise at this fraction of the 99th intensity percentile (a low-SNR acquisition).
    """
    dst.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    out = []
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if noise:
            p = rician(ds.pixel_array.astype(np.float64), noise, rng)
            ds.PixelData = np.clip(p, 0, np.iinfo(ds.pixel_array.dtype).max).astype(ds.pixel_array.dtype).tobytes()
        out.append(dst / f.name)
        ds.save_as(out[-1])
    return out


class Flow:
    """The annotator's steps in OHIF (selenium), with a screenshot per step and console errors collected."""

    def __init__(self, driver, folder: Path) -> None:
        self.d, self.folder, self.errors, self.shots = driver, folder, [], []
        self.keep = Path(os.environ["SPINEPATH_SCREENSHOTS"]) if os.environ.get("SPINEPATH_SCREENSHOTS") else None

    def wait(self, what: str, cond, timeout: float = 120):
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.5).until(lambda _: cond())
        except WebDriverException as exc:
            self.shot("failed")
            raise AssertionError(f"{what} (waited {timeout} s; console: {self.check()})") from exc

    def check(self) -> list[str]:
        self.errors += console_errors(self.d)
        return self.errors

    def shot(self, name: str) -> None:
        self.check()
        png = self.d.get_screenshot_as_png()
        (self.folder / f"{name}.png").write_bytes(png)
        self.shots.append(name)
        if self.keep is not None:  # a small PNG for the README
            self.keep.mkdir(parents=True, exist_ok=True)
            img = Image.open(io.BytesIO(png)).convert("RGB")
            img = img.resize((800, round(img.height * 800 / img.width)), Image.LANCZOS)
            img.quantize(colors=128).save(self.keep / f"{name}.png", optimize=True)

    def click(self, css: str | None = None, xpath: str | None = None) -> None:
        by, sel = (By.CSS_SELECTOR, css) if css else (By.XPATH, xpath)
        el = self.wait(f"{sel} clickable", lambda: next((e for e in self.d.find_elements(by, sel) if e.is_displayed()),
                                                        None))
        el.click()

    def menu(self, trigger, item: str) -> None:
        """Open the dropdown menu of ``trigger()`` (found again after hovering re-renders it) and choose an item
        (``"A > B"``: sub-menus open on hover)."""
        ActionChains(self.d).move_to_element(trigger()).perform()
        time.sleep(0.3)
        trigger().click()
        names = item.split(" > ")

        def entry(n: str):
            return next((m for m in self.d.find_elements(By.CSS_SELECTOR, "[role='menuitem']") if m.text == n), None)

        for i, name in enumerate(names):
            self.wait(f"menu item {name!r}", lambda n=name: entry(n), 10)
            if i == len(names) - 1:
                entry(name).click()
                return
            # a sub-menu: opens on hover, on click, or with the arrow key (radix), whichever takes
            for opener in (lambda n: ActionChains(self.d).move_to_element(entry(n)).perform(),
                           lambda n: entry(n).click(), lambda n: entry(n).send_keys(Keys.ARROW_RIGHT)):
                opener(name)
                time.sleep(0.7)
                if entry(names[i + 1]) is not None:
                    break

    def segment_names(self) -> list[str]:
        return [s.text for s in self.d.find_elements(By.CSS_SELECTOR, "div[data-cy='data-row'] span") if s.text]


def _seg_series(dicomweb: str, study: str) -> list[dict]:
    return [s for s in find_series(dicomweb, study) if s["Modality"] == "SEG"]


def test_annotator_flow_in_ohif(server: str, orthanc_url: str, model_dir: Path, browser,  # noqa: F811
                                tmp_path: Path) -> None:
    """Open in the MONAI Label mode -> connect -> run -> segments listed -> delete one -> export SEG -> the next
    round trains on it; "Next Sample" asks the uncertainty strategy; "Update Model" starts a round."""
    dicomweb = orthanc_url + DICOMWEB_ROOT
    files = _copy_with_new_uids(EXAMPLE, tmp_path / "study")
    store_files(dicomweb, files)
    detector, lab_map = VertebraDetector.load(resolve_model_path()), load_label_map()
    # an unlabeled study, with the Deploy app's kind of SEG (AUTOMATIC segments: a model's output, not a label)
    store_files(dicomweb, _copy_with_new_uids(EXAMPLE, tmp_path / "noisy", noise=0.25))
    noisy = load_study(tmp_path / "noisy")
    auto, auto_levels = render_labels(detect_series(noisy, detector))
    auto_seg = build_level_seg(noisy, np.stack([auto == lab_map[lv].value for lv in auto_levels]), auto_levels)
    auto_seg.save_as(tmp_path / "auto_seg.dcm")
    store_files(dicomweb, [tmp_path / "auto_seg.dcm"])
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    volume = load_study(tmp_path / "study")
    reference, drawn = render_labels(detect_series(volume, detector))
    assert len(drawn) >= 6, drawn
    flow, d = Flow(browser, tmp_path), browser
    d.delete_all_cookies()

    # 1. the study in the MONAI Label mode; the panel connects to this server and lists the model
    d.get(f"{server}/ohif/monai-label?StudyInstanceUIDs={study}")
    field = flow.wait("the MONAI Label panel", lambda: d.find_element(By.ID, "monailabelServerURL"))
    for banner in d.find_elements(By.XPATH, "//button[normalize-space()='Confirm and Hide']"):
        banner.click()  # OHIF's "for investigational use only" banner
    field.send_keys(Keys.CONTROL, "a")  # replace the default 127.0.0.1:8000 (clearing it first crashes the panel)
    d.find_element(By.ID, "monailabelServerURL").send_keys(server + "/")
    flow.click(css=".settingsTable button.actionButton")
    models = flow.wait("the model list", lambda: [o.text for o in d.find_elements(
        By.CSS_SELECTOR, ".modelSelector select option") if o.is_displayed()] or None, 60)
    assert models == ["vertebrae", "spine_structures"], models
    Select(d.find_element(By.CSS_SELECTOR, ".modelSelector select")).select_by_visible_text("vertebrae")
    flow.shot("1-connected")
    assert not flow.check(), flow.errors

    # 2. auto-segmentation: the named segments over the image, in OHIF's segmentation panel
    flow.click(xpath="//div[contains(@class,'modelSelector')]//button[normalize-space()='Run']")
    flow.wait("the segmentation result", lambda: "Running Segmentation - Successful" in d.page_source, 180)
    flow.click(css="[data-cy='panelSegmentation-btn']")
    names = flow.wait("the segment list", lambda: flow.segment_names() or None, 30)
    # every label of the served models, by name (OHIF lists the union: the structures' map holds the levels)
    assert sorted(names) == sorted(structure_label_map()), names
    flow.shot("2-segments")

    # 3. correct: delete the most cranial level found, then export the segmentation as DICOM SEG to the PACS
    removed = drawn[0]
    row = f"//div[@data-cy='data-row'][.//span[normalize-space(text())='{removed}']]"
    flow.menu(lambda: d.find_element(By.XPATH, row + "//button[@aria-label='Actions']"), "Delete")
    flow.wait(f"{removed} deleted", lambda: removed not in flow.segment_names(), 10)
    time.sleep(2)  # the viewports redraw the label map
    flow.shot("3-corrected")
    def segmentation_menu():  # the "..." beside the segmentation's name, above the segment list
        return next(b for b in d.find_elements(By.CSS_SELECTOR, "button[aria-haspopup='menu']")
                    if b.is_displayed() and b.get_attribute("aria-label") != "Actions"
                    and b.location["x"] > d.get_window_size()["width"] * 0.7 and b.location["y"] > 100)

    flow.menu(segmentation_menu, "Export & Download > Export DICOM SEG")
    name_field = flow.wait("the report name dialog", lambda: d.find_element(
        By.XPATH, "//div[.//text()[contains(., 'Enter the report name')]]//input"), 10)
    name_field.send_keys("vertebrae corrected by annotator")
    flow.shot("4-save")
    flow.click(xpath="//button[normalize-space()='Save']")
    segs = flow.wait("the SEG in Orthanc", lambda: _seg_series(dicomweb, study) or None, 60)
    assert len(segs) == 1, segs
    assert not flow.check(), flow.errors
    # the SEG holds exactly the model's boxes without the deleted level, by level name
    out = tmp_path / "fetched"
    seg = next(x for x in map(pydicom.dcmread, fetch_study(dicomweb, study, out)) if x.Modality == "SEG")
    expected = np.where(reference == lab_map[removed].value, 0, reference)
    np.testing.assert_array_equal(labels_from_seg(seg, volume, structure_label_map()), expected)

    # 4. "Next Sample" with the uncertainty strategy (back in the MONAI Label tab, which connects again)
    flow.click(css="[data-cy='monailabel-btn']")
    flow.click(css=".settingsTable button.actionButton")
    flow.click(xpath="//label[normalize-space()='Active Learning']")
    strategy = flow.wait("the strategy list", lambda: next(
        (s for s in d.find_elements(By.CSS_SELECTOR, ".monaiLabelPanel select") if s.is_displayed()
         and "uncertainty" in [o.text for o in s.find_elements(By.TAG_NAME, "option")]), None), 10)
    Select(strategy).select_by_visible_text("uncertainty")
    flow.click(xpath="//button[normalize-space()='Next Sample']")
    form = flow.wait("the next-sample form", lambda: next(iter(d.find_elements(By.CSS_SELECTOR, ".nextSampleForm table"
                                                                               )), None), 300)
    cells = {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
             for r in form.find_elements(By.CSS_SELECTOR, "tbody tr")}
    flow.shot("5-next-sample")
    r = requests.post(f"{server}/activelearning/uncertainty", json={}, timeout=TIMEOUT)  # the same (cached) choice
    r.raise_for_status()
    choice = r.json()
    assert cells["Series Instance UID"] == choice["id"] != series
    assert series not in choice["scores"] and choice["id"] == max(choice["scores"], key=choice["scores"].get)
    assert noisy.series_uid in choice["scores"]  # its AUTOMATIC SEG does not make it labeled
    ActionChains(d).click(d.find_element(By.XPATH, "//*[@data-cy='modal-header']/following-sibling::*[1]")).perform()
    flow.wait("the form to close", lambda: not d.find_elements(By.CSS_SELECTOR, ".ReactModal__Overlay"), 10)

    # 5. "Update Model" starts a retraining round, which trains on the exported SEG
    history = model_dir / "vertebrae" / "rounds" / "history.json"
    rounds = len(json.loads(history.read_text())) if history.is_file() else 0
    flow.click(xpath="//button[normalize-space()='Update Model']")
    flow.wait("the round to start", lambda: "Model update task STARTED" in d.page_source, 60)
    flow.shot("6-training")
    assert not flow.check(), flow.errors
    flow.wait("the round to finish", lambda: history.is_file() and len(json.loads(history.read_text())) > rounds
              and requests.get(f"{server}/train/", timeout=30).json().get("status") != "RUNNING", 600)

    def idle() -> bool:  # "Update Model" asks every served model for a round (spine_structures after vertebrae)
        if requests.get(f"{server}/train/", timeout=30).json().get("status") == "RUNNING":
            return False
        time.sleep(5)  # the next model's round may be starting
        return requests.get(f"{server}/train/", timeout=30).json().get("status") != "RUNNING"

    flow.wait("every model's round to finish", idle, 900)
    record = json.loads(history.read_text())[-1]
    (corr,) = [c for c in record["training_data"]["corrections"] if c["image"] == series]
    assert "skipped" not in corr and corr["levels"] == [lv for lv in drawn if lv != removed], corr
    assert noisy.series_uid not in [c["image"] for c in record["training_data"]["corrections"]]
    # the datastore holds that label: the exported SEG, newest of the series
    info = requests.get(f"{server}/datastore/", params={"output": "all"}, timeout=30).json()
    final = info["objects"][series]["labels"]["final"]["info"]
    assert final["SeriesInstanceUID"] == segs[0]["SeriesInstanceUID"] and final["levels"] == corr["levels"]
    assert flow.shots == ["1-connected", "2-segments", "3-corrected", "4-save", "5-next-sample", "6-training"]


def test_infer_and_save_label_as_seg(server: str, orthanc_url: str, source: pydicom.Dataset) -> None:  # noqa: F811
    series = source.SeriesInstanceUID
    # a path on the server is no series of the PACS: refused, not read
    bad = requests.post(f"{server}/infer/vertebrae", params={"image": "/etc", "output": "json"}, timeout=60)
    assert bad.status_code == 404 and "/etc" in bad.json()["detail"], bad.text
    r = requests.post(f"{server}/infer/vertebrae", params={"image": series, "output": "image"}, timeout=TIMEOUT)
    r.raise_for_status()
    path = Path(f"/tmp/spinepath-dicomweb-{time.time_ns()}.nii.gz")
    path.write_bytes(r.content)
    try:
        label = sitk.ReadImage(str(path))
        volume = load_study(EXAMPLE)
        arr = labels_on_volume(label, volume)
        lab_map = load_label_map()
        levels = [lv for lv in lab_map if np.any(arr == lab_map[lv].value)]
        assert {"L1", "L2", "L3", "L4", "L5"} <= set(levels)
        # the annotator saves it as final: it goes to Orthanc as a DICOM SEG in the same study
        with open(path, "rb") as fh:
            r = requests.put(f"{server}/datastore/label", params={"image": series, "tag": "final"},
                             files={"label": (path.name, fh, "application/gzip")}, data={"params": "{}"},
                             timeout=TIMEOUT)
        r.raise_for_status()
    finally:
        path.unlink(missing_ok=True)
    segs = [s for s in find_series(orthanc_url + DICOMWEB_ROOT, source.StudyInstanceUID) if s["Modality"] == "SEG"]
    corrected = [s for s in segs if "corrected" in (s.get("SeriesDescription") or "")]
    assert len(corrected) == 1, segs
    out = Path(f"/tmp/spinepath-dicomweb-fetch-{time.time_ns()}")
    try:
        files = fetch_study(orthanc_url + DICOMWEB_ROOT, source.StudyInstanceUID, out)
        seg = next(ds for ds in (pydicom.dcmread(p) for p in files)
                   if ds.SeriesInstanceUID == corrected[0]["SeriesInstanceUID"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    names = [s.SegmentDescription for s in seg.SegmentSequence]
    assert names == levels
    assert all(s.SegmentAlgorithmType == "MANUAL" for s in seg.SegmentSequence)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    # frames per segment match the label's slices
    per_segment = {}
    for f in seg.PerFrameFunctionalGroupsSequence:
        n = int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        per_segment[n] = per_segment.get(n, 0) + 1
    for i, lv in enumerate(levels, start=1):
        assert per_segment[i] == int(np.any(arr == lab_map[lv].value, axis=(1, 2)).sum()), lv
    # and the next retraining round trains on it (the datastore keeps the label beside the cached series)
    r = requests.post(f"{server}/train/vertebrae", params={"run_sync": "true"},
                      json={"epochs": 1, "lr": 0.0, "max_train_cases": 1}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    rec = r.json()
    (corr,) = [c for c in rec["training_data"]["corrections"] if c["image"] == series]
    assert "skipped" not in corr, corr
    assert corr["image"] == series and corr["levels"] == levels and rec["promoted"] is True
    # MONAI Label's own log of all this (server, infer, SEG store, training process) names no patient
    log = Path(__file__).resolve().parent.parent / "label" / "logs" / "app.log"
    assert log.is_file() and str(source.PatientID) not in log.read_text(errors="replace")


def test_spine_structures_over_dicomweb(server: str, orthanc_url: str, source: pydicom.Dataset,  # noqa: F811
                                        tmp_path: Path) -> None:
    """Task ``spine_structures`` over DICOMweb: the named masks of a PACS series, and an annotator's structure SEG
    written by another workstation (spinepath's segment names: "L3 vertebral body", "L3-L4 intervertebral
    disc", "spinal canal") read back from the PACS into a segmentation round."""
    dicomweb = orthanc_url + DICOMWEB_ROOT
    files = _copy_with_new_uids(EXAMPLE, tmp_path / "structures", seed=3)
    store_files(dicomweb, files)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    lab = structure_label_map()
    r = requests.post(f"{server}/infer/spine_structures", params={"image": series, "output": "image"},
                      timeout=TIMEOUT)
    r.raise_for_status()
    path = tmp_path / "structures.nii.gz"
    path.write_bytes(r.content)
    volume = load_study(tmp_path / "structures")
    arr = labels_on_volume(sitk.ReadImage(str(path)), volume)
    names = [n for n in lab if np.any(arr == lab[n].value)]
    assert {"L3", "L3-L4", "L4-L5", "spinal canal"} <= set(names), names
    # the annotator removes a disc drawn wrongly; another workstation stores the corrected masks as SEG
    arr[arr == lab["L4-L5"].value] = 0
    names.remove("L4-L5")
    seg = build_level_seg(volume, np.stack([arr == lab[n].value for n in names]), names, manual=True)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence][names.index("L3")] == "L3 vertebral body"
    seg.save_as(tmp_path / "corrected_seg.dcm")
    store_files(dicomweb, [tmp_path / "corrected_seg.dcm"])
    assert np.array_equal(labels_from_seg(seg, volume, lab), arr)  # spinepath's own names read back
    # the next segmentation round reads that SEG from the PACS (this server never saw the label)
    r = requests.post(f"{server}/train/spine_structures", params={"run_sync": "true"},
                      json={"epochs": 1, "lr": 0.0}, timeout=3 * TIMEOUT)  # a round scores ~40 selection slices
    assert r.status_code == 200, r.text
    rec = r.json()
    corr = {c["image"]: c for c in rec["training_data"]["corrections"]}
    assert corr[series].get("slices", 0) > 0, corr
    assert rec["promoted"] is True
