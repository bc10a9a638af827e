"""``status.json``: the machine-readable outcome of a run, written last (and alone when a study is refused)."""

from __future__ import annotations

import json
from pathlib import Path

from spinepath import __version__


def write_status(out_dir: str | Path, ok: bool, message: str, **fields: object) -> Path:
    """Write the machine-readable ``status.json`` (ok flag + message) into the output folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = out / "status.json"
    p.write_text(json.dumps({"ok": ok, "message": message, "software_version": __version__, **fields}, indent=1))
    return p
