"""Measurements on masks (issue 14, item 3): synthetic shapes of known size measure what they are."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from spinepath.measurements.shape import (
    angle_deg,
    canal_stenosis,
    chord,
    endplate_line,
    genant_grade,
    heights,
    listhesis,
    structure_axes,
)

SP = (0.5, 0.5)  # mm per pixel


def box(shape, r0_mm, c0_mm, h_mm, w_mm, spacing=SP, angle=0.0):
    """A filled rectangle (pixel centres inside), optionally rotated by ``angle`` degrees about its centre."""
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    y, x = rr * spacing[0], cc * spacing[1]
    cy, cx = r0_mm + h_mm / 2, c0_mm + w_mm / 2
    t = np.radians(angle)
    u = (x - cx) * np.cos(t) + (y - cy) * np.sin(t)
    v = -(x - cx) * np.sin(t) + (y - cy) * np.cos(t)
    return (np.abs(u) <= w_mm / 2) & (np.abs(v) <= h_mm / 2)


def test_a_25_mm_body_measures_25_mm():
    m = box((200, 200), 30, 20, 25.0, 40.0)
    h = heights(m, SP)
    for name in ("anterior", "middle", "posterior"):
        assert h[name].mm == pytest.approx(25.0, abs=0.5), name
    ax = structure_axes(m, SP)
    assert abs(ax.ap[1]) > 0.99 and ax.si[0] > 0.99  # AP along the columns, SI along the rows
    assert h["anterior"].start[1] < h["posterior"].start[1]  # anterior on the left
    # the same body with anisotropic pixels
    sp = (0.8, 0.4)
    m2 = box((120, 300), 30, 20, 25.0, 40.0, spacing=sp)
    assert heights(m2, sp)["middle"].mm == pytest.approx(25.0, abs=0.8)


def test_a_wedge_and_a_rotated_body():
    rr, cc = np.mgrid[0:200, 0:200]
    y, x = rr * SP[0], cc * SP[1]
    # anterior height 15 mm, posterior 25 mm, linear in between, 40 mm deep, bottom flat at 60 mm
    top = 60 - (15 + (x - 20) / 40 * 10)
    wedge = (x >= 20) & (x <= 60) & (y >= top) & (y <= 60)
    h = heights(wedge, SP)
    assert h["anterior"].mm < h["middle"].mm < h["posterior"].mm
    assert h["anterior"].mm / h["posterior"].mm == pytest.approx((15 + 0.15 * 10) / (15 + 0.85 * 10), abs=0.04)
    rot = box((200, 200), 30, 20, 25.0, 40.0, angle=20)
    assert heights(rot, SP)["middle"].mm == pytest.approx(25.0, abs=0.7)
    d, line = endplate_line(rot, SP, "superior")
    assert abs(angle_deg(np.array([0.0, 1.0]), d)) == pytest.approx(20, abs=1.5)
    assert line.mm == pytest.approx(0.8 * 40, abs=2)


def test_lordosis_angle_between_two_endplates():
    upper = box((300, 300), 20, 40, 25.0, 40.0, angle=-15)
    lower = box((300, 300), 100, 40, 25.0, 40.0, angle=25)
    du, _ = endplate_line(upper, SP, "superior")
    dl, _ = endplate_line(lower, SP, "superior")
    assert abs(angle_deg(du, dl)) == pytest.approx(40, abs=2)


def test_listhesis_offset_and_meyerding():
    lower = box((300, 300), 80, 40, 25.0, 40.0)
    aligned = box((300, 300), 45, 40, 25.0, 40.0)
    shifted = box((300, 300), 45, 30, 25.0, 40.0)  # 10 mm anterior: 25% of a 40 mm endplate
    assert abs(listhesis(aligned, lower, SP)["offset_mm"]) < 0.8
    r = listhesis(shifted, lower, SP)
    # the corners sit at 85% of each body's depth: 10 mm anterior, measured along the lower endplate
    assert r["offset_mm"] == pytest.approx(10.0, abs=0.8) and r["meyerding"] in (1, 2)
    back = listhesis(box((300, 300), 45, 50, 25.0, 40.0), lower, SP)
    assert back["offset_mm"] == pytest.approx(-10.0, abs=0.8)  # retrolisthesis is negative


def test_canal_chord_and_thresholds():
    canal = box((300, 200), 0, 60, 150.0, 11.0)  # an 11 mm wide canal
    ln = chord(canal, SP, (100, 130), np.array([0.0, 1.0]))
    assert ln.mm == pytest.approx(11.0, abs=0.5) and canal_stenosis(ln.mm) == "relative"
    assert canal_stenosis(9.0) == "absolute" and canal_stenosis(14.0) == "none"
    assert chord(canal, SP, (100, 10), np.array([1.0, 0.0])) is None


def test_chord_keeps_to_its_own_structure_and_genant_grades():
    two = box((300, 200), 20, 20, 25.0, 40.0) | box((300, 200), 55, 20, 25.0, 40.0)  # 10 mm gap
    ln = chord(two, SP, (65, 80), np.array([1.0, 0.0]))
    assert ln.mm == pytest.approx(25.0, abs=0.5)
    assert [genant_grade(x) for x in (0.1, 0.2, 0.3, 0.45)] == [0, 1, 2, 3]


def test_a_real_spider_vertebra_by_hand(data_root):
    """spider_seg patient 5, middle slice, the largest vertebra component (a lumbar body, 37 mm deep): its
    heights checked by hand on the image with the three lines drawn (endplate to endplate): anterior 29.1,
    middle 24.9 (slightly biconcave), posterior 26.2 mm."""
    from spinepath.data.spider import load_spider_seg

    case = next(c for c in load_spider_seg(data_root / "spider_seg") if c.patient == "5")
    _, msk = case.load(len(case.slices) // 2)
    lab, n = ndi.label(msk == 1)
    comp = lab == 1 + int(np.argmax(ndi.sum(np.ones_like(lab), lab, range(1, n + 1))))
    h = heights(comp, case.spacing)
    assert [round(h[k].mm, 1) for k in ("anterior", "middle", "posterior")] == pytest.approx([29.1, 24.9, 26.2],
                                                                                               abs=0.3)
    assert h["middle"].mm / h["posterior"].mm == pytest.approx(0.95, abs=0.01)  # biconcavity ratio
