"""MR sequence from the acquisition (issue 12 groundwork): crafted Siemens / Philips / GE headers, Enhanced MR
functional groups, the description only as a tie-breaker, and the real examples."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from spinepath.io.sequences import classify_sequence

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dicom_examples"


def header(**kw) -> Dataset:
    ds = Dataset()
    ds.Modality = "MR"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


CASES = [
    # (vendor convention, header, expected class)
    ("siemens t2 tse", dict(RepetitionTime=3500, EchoTime=98, ScanningSequence="SE",
                            SequenceVariant=["SK", "SP", "OSP"], ScanOptions="PFP",
                            SeriesDescription="t2_tse_sag_320"), "t2"),
    ("siemens t1 tse", dict(RepetitionTime=650, EchoTime=11, ScanningSequence="SE", SequenceVariant=["SK", "SP"],
                            SeriesDescription="t1_tse_sag"), "t1"),
    ("siemens tirm", dict(RepetitionTime=4000, EchoTime=60, InversionTime=160, ScanningSequence=["SE", "IR"],
                          SeriesDescription="t2_tirm_sag"), "fat_suppressed"),
    ("siemens t2 fs", dict(RepetitionTime=3800, EchoTime=90, ScanningSequence="SE", ScanOptions=["FS", "PFP"],
                           SeriesDescription="t2_tse_fs_sag"), "fat_suppressed"),
    ("siemens flash t1", dict(RepetitionTime=250, EchoTime=4.8, FlipAngle=70, ScanningSequence="GR",
                              SeriesDescription="t1_fl2d_sag"), "t1"),
    ("siemens medic t2*", dict(RepetitionTime=700, EchoTime=20, FlipAngle=30, ScanningSequence="GR",
                               SeriesDescription="medic_sag"), "t2"),
    ("philips t2 tse", dict(RepetitionTime=3000, EchoTime=120, ScanningSequence="SE", SequenceVariant="SK",
                            SeriesDescription="sT2W_TSE"), "t2"),
    ("philips stir", dict(RepetitionTime=3200, EchoTime=70, InversionTime=165, ScanningSequence="IR",
                          SeriesDescription="sSTIR"), "fat_suppressed"),
    ("philips pd", dict(RepetitionTime=2500, EchoTime=30, ScanningSequence="SE", SeriesDescription="sPDW_TSE"), "pd"),
    ("ge t2 fse", dict(RepetitionTime=3200, EchoTime=102, ScanningSequence="SE",
                       ScanOptions=["FAST_GEMS", "EDR_GEMS", "SAT_GEMS"], SeriesDescription="Sag T2 FSE"), "t2"),
    ("ge t1 fse", dict(RepetitionTime=500, EchoTime=9, ScanningSequence="SE", ScanOptions=["FAST_GEMS", "SAT_GEMS"],
                       SeriesDescription="Sag T1"), "t1"),
    ("ge t2 fat sat", dict(RepetitionTime=3500, EchoTime=85, ScanningSequence="SE", ScanOptions=["FAST_GEMS", "FS"],
                           SeriesDescription="Sag T2 FS"), "fat_suppressed"),
    # the acquisition wins over a misleading description
    ("t1 named t2", dict(RepetitionTime=600, EchoTime=10, ScanningSequence="SE", SeriesDescription="T2 SAG"), "t1"),
]


@pytest.mark.parametrize("name,kw,expected", CASES, ids=[c[0] for c in CASES])
def test_vendor_headers(name, kw, expected):
    seq = classify_sequence(header(**kw))
    assert seq.kind == expected, (name, seq)
    assert not seq.by_description and seq.reason


def test_description_only_breaks_ties():
    seq = classify_sequence(header(SeriesDescription="STIR_SAG"))  # no timing at all
    assert seq.kind == "fat_suppressed" and seq.by_description
    assert classify_sequence(header(SeriesDescription="T1 SAG")).kind == "t1"
    unknown = classify_sequence(header(SeriesDescription="SAG"))
    assert unknown.kind == "unknown" and "no repetition or echo time" in unknown.reason
    # timing present but ambiguous (TR 1500, TE 50): the description decides, and says so
    amb = classify_sequence(header(RepetitionTime=1500, EchoTime=50, SeriesDescription="t2_tse"))
    assert amb.kind == "t2" and amb.by_description and "TR 1500 TE 50" in amb.reason


def _enhanced(tr: float, te: float, ir: bool = False, ti: float | None = None) -> Dataset:
    timing, echo, mod = Dataset(), Dataset(), Dataset()
    timing.RepetitionTime, timing.FlipAngle = tr, 90
    echo.EffectiveEchoTime = te
    mod.InversionRecovery = "YES" if ir else "NO"
    if ti is not None:
        mod.InversionTimes = [ti]
    shared = Dataset()
    shared.MRTimingAndRelatedParametersSequence = [timing]
    shared.MREchoSequence = [echo]
    shared.MRModifierSequence = [mod]
    return header(EchoPulseSequence="SPIN", SharedFunctionalGroupsSequence=[shared], SeriesDescription="sag")


def test_enhanced_mr_functional_groups():
    assert classify_sequence(_enhanced(3500, 100)).kind == "t2"
    assert classify_sequence(_enhanced(600, 12)).kind == "t1"
    stir = classify_sequence(_enhanced(4000, 60, ir=True, ti=150))
    assert stir.kind == "fat_suppressed" and "TI 150" in stir.reason
    fs = _enhanced(3500, 90)
    fs.SpectrallySelectedSuppression = "FAT"
    assert classify_sequence(fs).kind == "fat_suppressed"


@pytest.mark.parametrize("case", ["chu_t2_02", "chu_t2_04"])
def test_real_examples_are_t2_by_acquisition(case):
    ds = pydicom.dcmread(sorted((EXAMPLES / case).glob("*.dcm"))[0], stop_before_pixels=True)
    seq = classify_sequence(ds)
    assert seq.kind == "t2" and not seq.by_description and "TR 3500 TE 100" in seq.reason
