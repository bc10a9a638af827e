"""NIfTI/NRRD/MHA volumes (MONAI Label's datastores) as sagittal series, and label volumes on their grid.

Volumes are read with SimpleITK and reoriented to the sagittal display the detector expects: columns toward
posterior, rows toward inferior, slices along the left-right axis (``"PIR"``); label volumes are written back
on the input's own grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinepath.core.errors import StudyError
from spinepath.core.files import atomic_file
from spinepath.core.geometry import SeriesVolume
from spinepath.io.dicom import load_study

#: Display orientation of a sagittal series (SimpleITK/DICOM "toward" letters: column, row, slice axes).
SAGITTAL_ORIENTATION = "PIR"


#: Volume file suffixes, longest first (stripped to get an image id; DICOM UIDs contain dots).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


#: A volume whose slice axis is this much coarser than in-plane is a 2D acquisition in that plane.
MAX_REFORMAT_ANISOTROPY = 1.5


def image_id(path: str | Path) -> str:
    """The image id of a volume file: its name without the volume suffix (``1.2.3.nii.gz`` -> ``1.2.3``)."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_from_volume(volume: SeriesVolume, pixels: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image with the series geometry (axes: column, row, slice), holding ``pixels`` or the series'."""
    arr = volume.pixels if pixels is None else pixels
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing((float(volume.spacing[1]), float(volume.spacing[0]), float(volume.slice_spacing)))
    img.SetOrigin(tuple(float(x) for x in volume.positions[0]))
    d = np.stack([volume.orientation[:3], volume.orientation[3:], volume.normal], axis=1)
    img.SetDirection(tuple(float(x) for x in d.ravel()))
    return img


def source_grid_image(volume: SeriesVolume) -> sitk.Image:
    """An empty uint8 image on the grid the series is stored on: stored rows and columns, slices along its normal.

    Label volumes written on it line up voxel for voxel with the archive's images (as a viewer loads them).
    """
    ip = volume.inplane
    iop = ip.source_orientation(volume.orientation)
    normal = np.cross(iop[:3], iop[3:])
    n = volume.pixels.shape[0]
    reverse = float(normal @ volume.normal) < 0
    row, col = ip.source_index(0, 0)
    origin = volume.pixel_to_patient(n - 1 if reverse else 0, row, col)
    spacing = volume.spacing[::-1] if ip.transpose else volume.spacing
    rows, cols = ip.source_shape or volume.pixels.shape[1:]
    img = sitk.Image(int(cols), int(rows), int(n), sitk.sitkUInt8)
    img.SetSpacing((float(spacing[1]), float(spacing[0]), float(volume.slice_spacing)))
    img.SetOrigin(tuple(float(x) for x in origin))
    img.SetDirection(tuple(float(x) for x in np.stack([iop[:3], iop[3:], normal], axis=1).ravel()))
    return img


def volume_from_image(image: sitk.Image, description: str = "") -> SeriesVolume:
    """A :class:`SeriesVolume` of a 3D image, reoriented to the sagittal display.

    Raises:
        StudyError: If the image is not 3D or was acquired in another plane (slice axis much coarser than
            in-plane and not left-right).

    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise StudyError("expected a 3D single-channel image")
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    sp = np.asarray(image.GetSpacing())
    lr_axis = int(np.argmax(np.abs(d[0])))  # image axis closest to patient x (left-right)
    coarse = int(np.argmax(sp))
    if coarse != lr_axis and sp[coarse] > MAX_REFORMAT_ANISOTROPY * np.delete(sp, coarse).max():
        raise StudyError("not a sagittal acquisition: the slice axis is not left-right")
    img = sitk.DICOMOrient(image, SAGITTAL_ORIENTATION)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    n = img.GetSize()[2]
    positions = np.array([img.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(n)], dtype=np.float64)
    return SeriesVolume(
        pixels=sitk.GetArrayFromImage(img).astype(np.float32),
        spacing=(float(img.GetSpacing()[1]), float(img.GetSpacing()[0])),
        orientation=np.concatenate([d[:, 0], d[:, 1]]),
        positions=positions,
        sop_instance_uids=[""] * n,
        series_uid="",
        study_uid="",
        frame_of_reference_uid="",
        description=description,
        slice_thickness=float(img.GetSpacing()[2]),
    )


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read an image file with SimpleITK.

    Raises:
        StudyError: If the file is not a readable volume.

    """
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise StudyError(f"cannot read {what} {Path(path).name}: not a readable volume") from exc


def read_volume(path: str | Path) -> SeriesVolume:
    """Read a NIfTI/NRRD/MHA volume as a sagittal :class:`SeriesVolume`.

    Raises:
        StudyError: If the file cannot be read or is not a sagittal 3D image.

    """
    return volume_from_image(read_image(path), Path(path).name)


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write an image atomically (temporary file in the same folder, then rename); the suffix picks the format."""
    path = Path(path)
    with atomic_file(path, "".join(path.suffixes) or ".nii.gz") as tmp:
        sitk.WriteImage(image, tmp, compress)
    return path


def write_label_like(labels: np.ndarray, volume: SeriesVolume, reference: sitk.Image, path: str | Path,
                     compress: bool = True) -> Path:
    """Write a label volume given on ``volume``'s (sagittal display) grid on the ``reference`` image's grid."""
    lab = image_from_volume(volume, labels.astype(np.uint8))
    out = sitk.Resample(lab, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return write_image(out, path, compress)


def labels_on_volume(label: sitk.Image, volume: SeriesVolume) -> np.ndarray:
    """A label image (any orientation, same physical grid) as an array indexed like ``volume.pixels``.

    Raises:
        StudyError: If the label image does not cover the volume's grid.

    """
    if label.GetSize()[0] * label.GetSize()[1] * label.GetSize()[2] != volume.pixels.size:
        raise StudyError(f"label size {label.GetSize()} does not match the image {volume.pixels.shape[::-1]}")
    ref = image_from_volume(volume, np.zeros(volume.pixels.shape, np.uint8))
    out = sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    return sitk.GetArrayFromImage(out).astype(np.int64)


def load_image_volume(path: str | Path) -> tuple[SeriesVolume, sitk.Image]:
    """A DICOM series folder (spinepath's reader) or a volume file, with an image of its grid for writing labels.

    Raises:
        StudyError: If it cannot be read or is not a sagittal series.

    """
    path = Path(path)
    if path.is_dir():
        volume = load_study(path)
        return volume, source_grid_image(volume)
    image = read_image(path)
    return volume_from_image(image, path.name), image

