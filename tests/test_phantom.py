import numpy as np

from spinepath.io.dicom import load_study
from spinepath.io.phantom import write_phantom_study


def test_phantom_is_deterministic_and_loads_as_sagittal_t2(tmp_path):
    a = write_phantom_study(tmp_path / "a")
    b = write_phantom_study(tmp_path / "b")
    va, vb = load_study(a), load_study(b)
    assert va.pixels.shape == (19, 320, 320)
    assert np.array_equal(va.pixels, vb.pixels) and va.series_uid == vb.series_uid
    assert va.slice_spacing == 4.0 and va.spacing == (1.0, 1.0)
    mid = va.pixels[9]
    # bright CSF canal and discs, darker bodies, noise present
    assert mid.max() > 450 and 100 < np.median(mid) < 300 and mid.std() > 20
