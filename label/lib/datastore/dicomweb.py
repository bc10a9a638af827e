"""DICOMweb datastore: final labels are DICOM SEG series in the PACS, read and written by level name.

A final label reaches the PACS in one of two ways: saved through MONAI Label (``PUT /datastore/label``), which
this datastore writes as a spinepath DICOM SEG (highdicom, no dcmqi), or exported from OHIF's segmentation
panel ("Export DICOM SEG"), which OHIF stores itself. Either way the SEG's segments are matched to levels by
name, never by segment number (OHIF numbers them in its own order), and the newest SEG of a series is the
label the trainer reads. A SEG whose segments are all AUTOMATIC (a model's output, such as the Deploy app's)
is not a label.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import SimpleITK as sitk
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom import Dataset

from spinepath.core.errors import StudyError
from spinepath.core.geometry import SeriesVolume
from spinepath.core.labels import Label
from spinepath.core.levels import VERTEBRA_LEVELS
from spinepath.io.dicom import load_study
from spinepath.io.volumes import labels_on_volume, write_label_like
from spinepath.labeling.labelmap import labels_from_seg
from spinepath.outputs.seg import build_level_seg

log = logging.getLogger(__name__)

SERIES_DESCRIPTION = "spinepath vertebrae corrected by annotator (NOT FOR DIAGNOSTIC USE)"
#: A final label with discs or the canal (task ``spine_structures``).
STRUCTURES_DESCRIPTION = "spinepath structures corrected by annotator (NOT FOR DIAGNOSTIC USE)"


def seg_time(ds) -> str:
    """Sortable creation time of a SEG: ContentDate + ContentTime (else the series date and time)."""
    date = str(ds.get("ContentDate") or ds.get("SeriesDate") or "")
    time = str(ds.get("ContentTime") or ds.get("SeriesTime") or "")
    return f"{date}{time.split('.')[0].ljust(6, '0')}"


class SpinePathDICOMWebDatastore(DICOMWebDatastore):
    """Images from a DICOMweb server (e.g. Orthanc); final labels are DICOM SEG series in the study.

    A label saved through MONAI Label becomes a SEG with one segment per structure: a vertebral level (its
    body or box), a disc, the canal (names, SNOMED CT codes and colours of ``configs/labels.json`` with its
    structures, algorithm type MANUAL) that references the source series, stored with
    STOW-RS; the label file is also kept in the local cache, which the trainer reads. A SEG found in the PACS
    (e.g. exported from OHIF) is converted to a label volume on the image's grid by segment name; of several
    SEGs of one series the newest (content date and time) is the final label.
    """

    label_map: dict[str, Label] = {}

    def _dicom_info(self, series_id: str) -> dict:
        """Image info without the patient: MONAI Label logs it (e.g. with every "Next Sample")."""
        info = super()._dicom_info(series_id)
        info.pop("PatientID", None)
        return info

    def annotator_labels(self) -> list[dict[str, str]]:
        """``{"image", "label", "study"}`` (UIDs: image series, SEG series, study) of the annotators' SEGs.

        An annotator's SEG has a segment that is not AUTOMATIC and references a listed image.
        """
        # not list_images(): it is cached for minutes, and a study stored since must count
        images = {str(Dataset.from_json(x).SeriesInstanceUID)
                  for x in self._client.search_for_series(search_filters=self._search_filter)}
        out = []
        for found in self._client.search_for_series(search_filters={"Modality": "SEG"}):
            seg = Dataset.from_json(found)
            meta = Dataset.from_json(self._client.retrieve_series_metadata(str(seg.StudyInstanceUID),
                                                                           str(seg.SeriesInstanceUID))[0])
            refs = meta.get("ReferencedSeriesSequence")
            if not refs or str(refs[0].SeriesInstanceUID) not in images:
                continue
            if all(str(x.get("SegmentAlgorithmType", "")) == "AUTOMATIC" for x in meta.get("SegmentSequence", [])):
                continue  # a model's output
            out.append({"image": str(refs[0].SeriesInstanceUID), "label": str(seg.SeriesInstanceUID),
                        "study": str(seg.StudyInstanceUID)})
        return out

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Images with an annotator's SEG in the PACS."""
        return sorted({x["image"] for x in self.annotator_labels()})

    def _download_labeled_data(self) -> None:
        """Bring the local final labels in line with the annotators' SEGs (called by ``datalist``)."""
        remote = self.annotator_labels()
        for image in set(LocalDatastore.get_labeled_images(self, DefaultLabelTag.FINAL)) - {x["image"] for x in remote}:
            log.info("final label of %s has no SEG on the DICOMweb server any more: removed", image)
            LocalDatastore.remove_label(self, image, DefaultLabelTag.FINAL)
        for x in remote:
            self._label_from_seg(x["image"], x["label"], x["study"])

    def _volume(self, image_id: str) -> tuple[SeriesVolume, str]:
        """The image's series (downloaded into the cache when needed) and the path MONAI Label serves for it."""
        uri = self.get_image_uri(image_id)
        return load_study(os.path.join(self._datastore.image_path(), image_id)), uri

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict,
                   label_id: str = "") -> str:
        """Save a label; a final one also goes to the DICOMweb server as DICOM SEG."""
        if label_tag != DefaultLabelTag.FINAL or label_filename.endswith(".bin"):
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        volume, _ = self._volume(image_id)
        try:
            labels = labels_on_volume(sitk.ReadImage(label_filename), volume)
        except RuntimeError as exc:
            raise ValueError(f"the label of {image_id} is not a readable volume") from exc
        # the local copy first (what the trainer reads), then the SEG for the PACS
        label_id = LocalDatastore.save_label(self, image_id, label_filename, label_tag, dict(label_info))
        by_value = {lab.value: lab.name for lab in self.label_map.values()}
        values = [v for v in sorted(by_value) if np.any(labels == v)]
        if values:
            masks = np.stack([labels == v for v in values])
            names = [by_value[v] for v in values]
            structures = any(n not in VERTEBRA_LEVELS for n in names)
            seg = build_level_seg(volume, masks, names, manual=True,
                                  series_description=STRUCTURES_DESCRIPTION if structures else SERIES_DESCRIPTION,
                                  content="Vertebral bodies, discs and spinal canal corrected by an annotator"
                                  if structures else None)
            self._client.store_instances([seg])
            uid, created = str(seg.SeriesInstanceUID), seg_time(seg)
            label_info.update({"SeriesInstanceUID": uid, "Modality": "SEG",
                               "StudyInstanceUID": str(seg.StudyInstanceUID), "seg_time": created,
                               "segs_seen": {uid: created}, "levels": [by_value[v] for v in values]})
            self.update_label_info(label_id, label_tag, label_info)
            log.info("stored SEG with %d levels for series %s", len(values), image_id)
        return label_id

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A label file.

        A final label by image id comes from the local store (also ``remove_label``'s lookup); by SEG series UID
        (``label_id``) of ``image_id`` through :meth:`_label_from_seg`; anything else as the parent class does.
        """
        if label_tag == DefaultLabelTag.FINAL and image_id and label_id != image_id:
            return self._label_from_seg(image_id, label_id)
        local = LocalDatastore.get_label_uri(self, label_id, label_tag) if label_tag == DefaultLabelTag.FINAL else ""
        return local or super().get_label_uri(label_id, label_tag, image_id)

    def _label_from_seg(self, image_id: str, seg_uid: str, study: str | None = None) -> str:
        """The local final label of ``image_id``, replaced by the SEG series ``seg_uid`` when that is newer.

        Each SEG's creation time is recorded with the label (``segs_seen``), so a SEG is fetched once.
        """
        tag = DefaultLabelTag.FINAL
        local = LocalDatastore.get_label_uri(self, image_id, tag)
        info = LocalDatastore.get_label_info(self, image_id, tag) if local else {}
        seen = dict(info.get("segs_seen") or {})
        if seg_uid in seen and seen[seg_uid] <= info.get("seg_time", ""):
            return local  # this SEG is the current label, or older than it
        if study is None:
            meta = self._client.search_for_series(search_filters={"SeriesInstanceUID": seg_uid})
            study = str(meta[0]["0020000D"]["Value"][0]) if meta else None
        instances = self._client.retrieve_series(study, seg_uid) if study else []
        if not instances:
            log.warning("SEG %s of %s not found on the DICOMweb server", seg_uid, image_id)
            return local
        seg = instances[0]
        created = seg_time(seg)
        seen[seg_uid] = created
        if local and info.get("seg_time", "") >= created:
            self.update_label_info(image_id, tag, {**info, "segs_seen": seen})
            return local
        volume, image_uri = self._volume(image_id)
        try:
            labels = labels_from_seg(seg, volume, self.label_map)
        except StudyError as exc:
            log.warning("SEG %s of %s not used: %s", seg_uid, image_id, exc)
            if local:
                self.update_label_info(image_id, tag, {**info, "segs_seen": seen})
            return local
        fd, tmp = tempfile.mkstemp(suffix=".nii.gz", prefix="seg-label-")
        os.close(fd)
        try:
            write_label_like(labels, volume, sitk.ReadImage(image_uri), tmp)
            LocalDatastore.save_label(self, image_id, tmp, tag, {
                "SeriesInstanceUID": seg_uid, "Modality": "SEG", "StudyInstanceUID": study, "seg_time": created,
                "segs_seen": seen, "levels": [n for n, lab in self.label_map.items() if np.any(labels == lab.value)]})
        finally:
            os.unlink(tmp)
        log.info("final label of %s from SEG %s", image_id, seg_uid)
        return LocalDatastore.get_label_uri(self, image_id, tag)
