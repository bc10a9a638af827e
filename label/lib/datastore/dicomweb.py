"""DICOMweb datastore whose final labels go to the PACS as spinepath DICOM SEG (highdicom, no dcmqi)."""

from __future__ import annotations

import logging
import os

import numpy as np
import SimpleITK as sitk
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from spinepath.core.labels import Label
from spinepath.io.dicom import load_study
from spinepath.io.volumes import labels_on_volume
from spinepath.outputs.seg import build_level_seg

log = logging.getLogger(__name__)

SERIES_DESCRIPTION = "spinepath vertebrae corrected by annotator (NOT FOR DIAGNOSTIC USE)"


class SpinePathDICOMWebDatastore(DICOMWebDatastore):
    """Images from a DICOMweb server (e.g. Orthanc); a saved final label becomes a DICOM SEG in the study.

    The SEG has one segment per level (names, SNOMED CT codes and colours of ``configs/labels.json``,
    algorithm type MANUAL) and references the source series; it is stored with STOW-RS. The label file is
    also kept in the local cache, which the trainer reads.
    """

    label_map: dict[str, Label] = {}

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict,
                   label_id: str = "") -> str:
        """Save a label; a final one also goes to the DICOMweb server as DICOM SEG."""
        if label_tag != DefaultLabelTag.FINAL or label_filename.endswith(".bin"):
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        self.get_image_uri(image_id)  # downloads the series into the cache when needed
        volume = load_study(os.path.join(self._datastore.image_path(), image_id))
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
            seg = build_level_seg(volume, masks, [by_value[v] for v in values], manual=True,
                                  series_description=SERIES_DESCRIPTION)
            self._client.store_instances([seg])
            label_info.update({"SeriesInstanceUID": str(seg.SeriesInstanceUID), "Modality": "SEG",
                               "StudyInstanceUID": str(seg.StudyInstanceUID)})
            self.update_label_info(label_id, label_tag, label_info)
            log.info("stored SEG with %d levels for series %s", len(values), image_id)
        return label_id
