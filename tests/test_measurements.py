"""Measurements on masks (issue 14, item 3): synthetic shapes of known size measure what they are."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from spinepath.core.thresholds import canal_stenosis, genant_grade
from spinepath.measurements.shape import (
    angle_deg,
    chord,
    corner,
    endplate_line,
    heights,
    listhesis,
    listhesis_over_disc,
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


def _about(pivot, r0, c0, h_mm, w_mm, angle):
    """:func:`box` rotated by ``angle`` degrees about ``pivot`` (mm) instead of its own centre."""
    dx, dy = c0 + w_mm / 2 - pivot[1], r0 + h_mm / 2 - pivot[0]
    t = np.radians(angle)
    cx, cy = dx * np.cos(t) - dy * np.sin(t), dx * np.sin(t) + dy * np.cos(t)
    return box((300, 300), pivot[0] + cy - h_mm / 2, pivot[1] + cx - w_mm / 2, h_mm, w_mm, angle=angle)


def test_a_lordotic_segment_without_slip_reads_no_slip():
    """Two aligned bodies bent 20 degrees about the posterior disc's middle (a lordotic L4-L5): their posterior
    corners lie on the walls' bisector, so no slip; across the lower wall alone they would read 1.7 mm backward
    (half the 10 mm posterior disc height x sin 20 degrees)."""
    pivot, gap = (100.0, 90.0), 10.0
    upper = _about(pivot, pivot[0] - gap / 2 - 25, pivot[1] - 40, 25.0, 40.0, 10.0)
    lower = _about(pivot, pivot[0] + gap / 2, pivot[1] - 40, 25.0, 40.0, -10.0)
    r = listhesis(upper, lower, SP)
    assert abs(r["offset_mm"]) < 0.5 and r["meyerding"] == 0
    pa, pb, pb2 = (np.array(corner(m, SP, side)) * SP for m, side in ((upper, "inferior"), (lower, "superior"),
                                                                       (lower, "inferior")))
    wall = (pb2 - pb) / np.linalg.norm(pb2 - pb)
    assert abs((pb - pa) @ np.array([-wall[1], wall[0]])) == pytest.approx(1.7, abs=0.3)
    # a real slip on the same bent segment still reads: the upper body 8 mm anterior before the bend
    shifted = _about(pivot, pivot[0] - gap / 2 - 25, pivot[1] - 48, 25.0, 40.0, 10.0)
    assert listhesis(shifted, lower, SP)["offset_mm"] == pytest.approx(8.0 * np.cos(np.radians(10)), abs=0.6)


def test_listhesis_over_the_disc_where_the_lower_body_is_not_segmented():
    """L5 over S1 with only the L5-S1 disc segmented below it: the disc's inferior boundary is S1's endplate."""
    disc = box((300, 300), 70, 40, 10.0, 40.0)
    aligned = box((300, 300), 45, 40, 25.0, 40.0)
    assert abs(listhesis_over_disc(aligned, disc, SP)["offset_mm"]) < 0.8
    r = listhesis_over_disc(box((300, 300), 45, 30, 25.0, 40.0), disc, SP)  # 10 mm anterior
    assert r["offset_mm"] == pytest.approx(10.0, abs=0.8) and r["meyerding"] == 2  # of the 32 mm fitted endplate
    assert r["line"].mm == pytest.approx(10.0, abs=0.8)
    back = listhesis_over_disc(box((300, 300), 45, 46, 25.0, 40.0), disc, SP)
    assert back["offset_mm"] == pytest.approx(-6.0, abs=0.8) and back["meyerding"] == 1


@pytest.mark.parametrize("angle", [-25.0, -8.0, 0.0, 12.0, 30.0])
def test_a_square_body_keeps_its_axes_along_its_sides(angle):
    """A lateral-slice body as deep as it is tall (30 x 30 mm), tilted: its principal axes point anywhere, its
    heights still run endplate to endplate (the enclosing rectangle's sides)."""
    m = box((260, 260), 50, 50, 30.0, 30.0, angle=angle)
    ax = structure_axes(m, SP)
    t = np.radians(angle)
    assert abs(ax.ap @ np.array([np.sin(t), np.cos(t)])) > np.cos(np.radians(2.0))
    h = heights(m, SP, ax)
    for name in ("anterior", "middle", "posterior"):
        assert h[name].mm == pytest.approx(30.0, abs=0.6), name


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
    heights checked by hand on the image with the three lines drawn (endplate to endplate, across the mean
    endplate direction, tilted about 8 degrees here; end points read off the figure give 28.4 / 24.4 / 26.8 mm):
    the code's single runs give anterior 28.4, middle 24.5 (slightly biconcave), posterior 26.9 mm. The product's
    heights, the mean of nine runs over +-10% of the depth around each position, stay within the band's runs:
    28.2, 24.4 and 26.2 mm (the posterior band reaches towards the rounded corner)."""
    from spinepath.data.spider import load_spider_seg
    from spinepath.measurements.shape import HEIGHT_POSITIONS, HEIGHT_RUNS

    case = next(c for c in load_spider_seg(data_root / "spider_seg") if c.patient == "5")
    _, msk = case.load(len(case.slices) // 2)
    lab, n = ndi.label(msk == 1)
    comp = lab == 1 + int(np.argmax(ndi.sum(np.ones_like(lab), lab, range(1, n + 1))))
    h = heights(comp, case.spacing, band=0)
    assert [round(h[k].mm, 1) for k in ("anterior", "middle", "posterior")] == pytest.approx([28.4, 24.4, 26.8],
                                                                                               abs=0.3)
    assert h["middle"].mm / h["posterior"].mm == pytest.approx(0.91, abs=0.01)  # biconcavity ratio
    band = heights(comp, case.spacing)
    assert [round(band[k].mm, 1) for k in ("anterior", "middle", "posterior")] == pytest.approx([28.2, 24.4, 26.2],
                                                                                                  abs=0.1)
    ax = structure_axes(comp, case.spacing)
    depth = chord(comp, case.spacing, ax.centre, ax.ap)
    s0 = np.array(depth.start) * case.spacing
    for k, f in HEIGHT_POSITIONS.items():
        runs = [chord(comp, case.spacing, tuple((s0 + ax.ap * g * depth.mm) / case.spacing), ax.si).mm
                for g in np.linspace(f - 0.1, f + 0.1, HEIGHT_RUNS)]
        assert band[k].mm == pytest.approx(np.mean(runs)) and min(runs) <= band[k].mm <= max(runs)
        # drawn through the position, as long as the value
        a, b = np.array(band[k].start) * case.spacing, np.array(band[k].end) * case.spacing
        assert np.linalg.norm(b - a) == pytest.approx(band[k].mm)


def synthetic_spine():
    """L1-L5 bodies 25 mm tall (L3 crushed to 17.5 mm in front: a 30% wedge), 40 mm deep, 10 mm discs, S1;
    a 14 mm canal behind, narrowed to 9 mm at L4-L5; L4 shifted 6 mm forward over L5."""
    shape = (700, 300)
    bodies, discs = {}, {}
    top = 20.0
    for lv in ("L1", "L2", "L3", "L4", "L5", "S1"):
        c0 = 30.0 - (6.0 if lv == "L4" else 0.0)
        m = box(shape, top, c0, 25.0, 40.0)
        if lv == "L3":  # anterior part shortened from above: 17.5 mm anterior, 25 mm posterior
            rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
            y, x = rr * SP[0], cc * SP[1]
            m &= y >= top + 7.5 * (1 - np.clip((x - c0) / 40.0, 0, 1))
        bodies[lv] = m
        top += 25.0
        if lv != "S1":
            nxt = {"L1": "L2", "L2": "L3", "L3": "L4", "L4": "L5", "L5": "S1"}[lv]
            discs[f"{lv}-{nxt}"] = box(shape, top, 30.0, 10.0, 40.0)
            top += 10.0
    canal = box(shape, 0, 75.0, 340.0, 14.0)
    l45 = discs["L4-L5"]
    rows = np.flatnonzero(l45.any(1))
    canal[rows.min():rows.max() + 1] = box(shape, 0, 75.0, 340.0, 9.0)[rows.min():rows.max() + 1]
    image = np.where(canal, 200.0, 0.0) + np.where(np.any(list(discs.values()), axis=0), 100.0, 0.0)
    return bodies, discs, canal, image


def test_measurements_of_a_synthetic_spine():
    from spinepath.measurements.spine import measure_spine

    bodies, discs, canal, image = synthetic_spine()
    m = measure_spine(bodies, discs, canal, SP, image)
    assert m["vertebrae"]["L2"]["middle"]["mm"] == pytest.approx(25.0, abs=0.5)
    assert m["vertebrae"]["L2"]["wedge_ratio"] == pytest.approx(1.0, abs=0.03)
    l3 = m["vertebrae"]["L3"]
    assert l3["anterior"]["mm"] < l3["posterior"]["mm"] and l3["genant_grade"] >= 1
    assert m["vertebrae"]["L2"]["genant_grade"] == 0
    d = m["discs"]["L2-L3"]
    assert d["middle"]["mm"] == pytest.approx(10.0, abs=0.6)
    assert m["discs"]["L1-L2"]["disc_height_index"] == pytest.approx(10.0 / 25.0, abs=0.03)
    assert d["disc_height_index"] > 0.42  # L3 is shorter: the same disc is relatively higher
    assert d["canal_ap"]["mm"] == pytest.approx(14.0, abs=0.6) and d["canal_ap"]["stenosis"] == "none"
    assert m["discs"]["L4-L5"]["canal_ap"]["mm"] == pytest.approx(9.0, abs=0.6)
    assert m["discs"]["L4-L5"]["canal_ap"]["stenosis"] == "absolute"
    # the same narrow canal named as a thoracic level is measured but not graded (the thresholds are lumbar)
    thor = measure_spine({"T10": bodies["L4"], "T11": bodies["L5"]}, {"T10-T11": discs["L4-L5"]}, canal, SP, image)
    assert thor["discs"]["T10-T11"]["canal_ap"]["mm"] == pytest.approx(9.0, abs=0.6)
    assert thor["discs"]["T10-T11"]["canal_ap"]["stenosis"] == "not graded"
    assert thor["vertebrae"]["T10"]["canal_ap_mid_body"]["stenosis"] == "not graded"
    assert d["t2_signal_ratio"] == pytest.approx(0.5, abs=0.01)
    assert m["listhesis"]["L4-L5"]["offset_mm"] == pytest.approx(6.0, abs=0.8)
    assert m["listhesis"]["L4-L5"]["meyerding"] == 1 and abs(m["listhesis"]["L2-L3"]["offset_mm"]) < 0.8
    assert m["lordosis_deg"] == pytest.approx(0.0, abs=1.5)  # a straight synthetic spine
    assert m["listhesis"]["L5-S1"]["against"] == "body" and abs(m["listhesis"]["L5-S1"]["offset_mm"]) < 0.8
    # without the S1 body (the sacrum is rarely segmented) L5-S1 is measured against the disc, the same slip
    no_s1 = measure_spine({k: v for k, v in bodies.items() if k != "S1"}, discs, canal, SP, image)
    assert no_s1["listhesis"]["L5-S1"]["against"] == "disc" and abs(no_s1["listhesis"]["L5-S1"]["offset_mm"]) < 0.8
    assert no_s1["listhesis"]["L4-L5"] == m["listhesis"]["L4-L5"]
    assert m["vertebrae"]["L2"]["canal_ap_mid_body"]["mm"] == pytest.approx(14.0, abs=0.6)


def test_s1_body_is_not_measured():
    """S1's body gets no heights (fused with the sacrum, no endplate below: its mask runs into S2), so no ratios,
    no height loss, and no part in L5's height loss or the L5-S1 disc's height index; its superior endplate still
    ends the lordosis and its posterior wall takes the L5-S1 slip."""
    from spinepath.measurements.spine import measure_spine

    bodies, discs, canal, image = synthetic_spine()
    s1 = bodies["S1"]
    rows, cols = np.flatnonzero(s1.any(1)), np.flatnonzero(s1.any(0))
    tall = s1.copy()
    tall[rows[0]:rows[0] + int(round(40.0 / SP[0])), cols[0]:cols[-1] + 1] = True  # S1 and S2 as one, 40 mm
    m = measure_spine({**bodies, "S1": tall}, discs, canal, SP, image)
    assert set(m["vertebrae"]["S1"]) == {"canal_ap_mid_body"}
    assert m["vertebrae"]["S1"]["canal_ap_mid_body"]["stenosis"] == "not graded"  # the sacral canal
    # L5 against L4 alone (25 mm each): no loss; with the 40 mm S1 as a neighbour it would read 23 % (grade 1)
    assert m["vertebrae"]["L5"]["height_loss"] == pytest.approx(0.0, abs=0.04)
    assert m["vertebrae"]["L5"]["genant_grade"] == 0
    assert m["discs"]["L5-S1"]["disc_height_index"] == pytest.approx(10.0 / 25.0, abs=0.03)  # over L5 alone
    assert m["lordosis_deg"] == pytest.approx(0.0, abs=1.5)
    assert m["listhesis"]["L5-S1"]["against"] == "body" and abs(m["listhesis"]["L5-S1"]["offset_mm"]) < 0.8
    # without a canal, S1 has nothing measured and no entry
    assert "S1" not in measure_spine(bodies, discs, None, SP, image)["vertebrae"]


def test_a_steep_s1_whose_endplate_cannot_be_told_from_a_wall_is_left_out():
    """S1 tilted 40 degrees below L5: measured when its centre lies below L5's; moved 10 mm back, the line from
    L5's centre to S1's lies nearer S1's endplate than across it, the spine-direction hint turns S1's axes and its
    superior endplate would be read on its anterior wall (lordosis 49.6 instead of 40; SPIDER patients 19, 64,
    156): then S1 takes no part in the lordosis and the L5-S1 slip, and says why."""
    from spinepath.measurements.spine import UNCLEAR_ENDPLATE, measure_spine

    bodies, discs, canal, image = synthetic_spine()
    shape = bodies["L1"].shape

    def with_s1(back_mm: float) -> dict:
        b = {**bodies, "S1": box(shape, 200, 30 + back_mm, 26.0, 34.0, angle=40)}
        d = {**discs, "L5-S1": box(shape, 188, 30 + back_mm / 2, 8.0, 38.0, angle=20)}
        return measure_spine(b, d, canal, SP, image)

    below = with_s1(0.0)
    assert below["lordosis_deg"] == pytest.approx(40.0, abs=1.5) and "not_measured" not in below
    assert below["listhesis"]["L5-S1"]["against"] == "body"
    back = with_s1(10.0)
    assert back["lordosis_deg"] is None and "L5-S1" not in back["listhesis"]
    assert back["not_measured"] == {"S1": UNCLEAR_ENDPLATE}
    assert "S1" in below["vertebrae"] and "S1" not in back["vertebrae"]  # nor the canal across its unclear axes
    assert back["listhesis"]["L4-L5"] == below["listhesis"]["L4-L5"]


def test_a_spine_of_bodies_taller_than_deep():
    """Bodies 32 mm tall and 22 mm deep (thoracic-like, or a small patient's): their longer side runs along the
    spine, so it is their height, not their endplates; without the spine's direction their "AP" axis was read
    along the spine and the slips came out tens of millimetres (SPIDER patients 100, 38)."""
    from spinepath.measurements.shape import structure_axes
    from spinepath.measurements.spine import measure_spine

    shape = (700, 300)
    bodies, discs = {}, {}
    top = 20.0
    for lv in ("T12", "L1", "L2", "L3", "L4", "L5"):
        bodies[lv] = box(shape, top, 40.0 - (4.0 if lv == "L3" else 0.0), 32.0, 22.0)
        top += 32.0
        if lv != "L5":
            discs[f"{lv}-{'L1' if lv == 'T12' else 'L' + str(int(lv[1]) + 1)}"] = box(shape, top, 40.0, 8.0, 22.0)
            top += 8.0
    assert abs(structure_axes(bodies["L2"], SP).ap[0]) > 0.9  # alone: the long side, along the spine
    m = measure_spine(bodies, discs, None, SP)
    for lv in ("L1", "L2", "L4"):
        assert m["vertebrae"][lv]["middle"]["mm"] == pytest.approx(32.0, abs=0.6), lv
        assert m["vertebrae"][lv]["wedge_ratio"] == pytest.approx(1.0, abs=0.03)
    assert m["listhesis"]["L3-L4"]["offset_mm"] == pytest.approx(4.0, abs=0.8)
    assert abs(m["listhesis"]["L4-L5"]["offset_mm"]) < 0.8 and abs(m["listhesis"]["T12-L1"]["offset_mm"]) < 0.8
    assert m["discs"]["L1-L2"]["middle"]["mm"] == pytest.approx(8.0, abs=0.6)


def test_the_marrow_signal_next_to_an_endplate():
    """A bright band 4 mm deep under L4's inferior endplate (a Modic-like patch) reads bright against L4's own core
    and the slice's bodies, on the L4-L5 disc's *above* side only; an even body reads 1; S1 missing leaves
    L5-S1's *below* side unmeasured; a body too small for a band and a core gives nothing."""
    from spinepath.measurements.marrow import marrow_features, marrow_signal

    bodies = synthetic_spine()[0]
    image = np.zeros(bodies["L1"].shape)
    for m in bodies.values():
        image[m] = 100.0
    rows = np.flatnonzero(bodies["L4"].any(1))
    image[rows.max() - 7:rows.max() + 1][bodies["L4"][rows.max() - 7:rows.max() + 1]] = 300.0  # the last 4 mm
    s = marrow_signal(image, bodies, SP[0])
    assert s["L4-L5"]["above"]["band_to_core"] == pytest.approx(301 / 101, abs=1e-3)
    assert s["L4-L5"]["above"]["band_to_bodies"] == pytest.approx(301 / 101, abs=1e-3)
    assert s["L4-L5"]["below"] == {"band_to_core": 1.0, "band_to_bodies": 1.0}
    assert s["L3-L4"]["below"] == {"band_to_core": 1.0, "band_to_bodies": 1.0}  # L4's upper band is even
    assert set(s) == {"T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"} and s["T12-L1"]["above"] is None
    no_s1 = marrow_signal(image, {k: v for k, v in bodies.items() if k != "S1"}, SP[0])
    assert no_s1["L5-S1"]["below"] is None and no_s1["L5-S1"]["above"] is not None
    assert marrow_signal(image, {"L1": box(bodies["L1"].shape, 20, 30, 2.0, 3.0)}, SP[0]) == {}
    f = marrow_features(s["L4-L5"])
    assert f[:2] == pytest.approx(np.log(301 / 101), abs=1e-3) and not f[2:].any()
    assert list(marrow_features(no_s1["L5-S1"])[4:]) == [0.0, 1.0] and list(marrow_features(None)[4:]) == [1.0, 1.0]
