"""The scripts' JSON reports: printed, and written whole or not at all (``spinepath.core.files.print_json``)."""

from __future__ import annotations

import json

from spinepath.core.files import print_json


def test_print_json_prints_and_writes_the_same_report(tmp_path, capsys):
    report = {"task": "segmentation_extent", "dice": 0.9199, "cases": [{"case": "02"}]}
    out = tmp_path / "reports" / "extent.json"  # a folder that does not exist yet
    print_json(report, out)
    printed = capsys.readouterr().out
    assert json.loads(printed) == report and out.read_text() == printed
    assert [p.name for p in out.parent.iterdir()] == ["extent.json"]  # no temporary file left behind
    print_json(report)
    assert json.loads(capsys.readouterr().out) == report
