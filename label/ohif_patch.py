"""Three fixes to the OHIF viewer bundled with monailabel 0.8.5, applied when ``.venv-label`` is set up.

1. The *MONAI Label* mode has only the MONAI Label panel on the right, so an annotator can run the model but
   not see, rename, delete or save segments: the mode gets OHIF's segmentation panel as a second tab (its
   bundle already names it; the variant with tools is not used because this mode defines no brush buttons).
2. That panel's "Export DICOM SEG" calls OHIF's ``storeSegmentation`` command without a data source and
   fails with "Cannot read properties of undefined (reading 'store')": it now defaults to the active one.
3. The MONAI Label panel's strategy list has no change handler (``onChangeStrategy`` is never defined), so
   "Next Sample" always asks ``random``: the chosen strategy is now used.

Idempotent; exits non-zero naming the file when the bundle does not contain the expected code (a monailabel
upgrade: check the panel again, ``tests/test_label_dicomweb.py`` drives it in a browser).
Usage: ``.venv-label/bin/python label/ohif_patch.py [OHIF_FOLDER]`` (default: monailabel's bundled OHIF)
"""

from __future__ import annotations

import sys
from pathlib import Path

import monailabel

from spinepath.core.files import atomic_file

MARK = "/* spinepath patch */"
PATCHES = [
    ("routeName: 'monai-label'",
     "rightPanels: [monailabel.monaiLabel],",
     f"rightPanels: [monailabel.monaiLabel, '@ohif/extension-cornerstone.panelModule.panelSegmentation'],{MARK}"),
    ("storeSegmentation: async ({",
     "      await dataSource.store.dicom(naturalizedReport);",
     f"      dataSource = dataSource || extensionManager.getActiveDataSource()[0];{MARK}\n"
     "      await dataSource.store.dicom(naturalizedReport);"),
    ("class OptionTable extends BaseTab",
     "      strategy: 'random',\n      training: false,\n      segmentId: 'liver'\n    };\n",
     "      strategy: 'random',\n      training: false,\n      segmentId: 'liver'\n    };\n"
     f"    this.onChangeStrategy = evt => this.setState({{ strategy: evt.target.value }});{MARK}\n"),
]


def main(ohif: Path | None = None) -> int:
    """Patch the OHIF bundles in ``ohif`` in place; 0 when patched (now or before)."""
    ohif = ohif or Path(monailabel.__file__).parent / "endpoints" / "static" / "ohif"
    bundles = {p: p.read_text(encoding="utf-8") for p in sorted(ohif.glob("*.bundle.*.js"))}
    for marker, old, new in PATCHES:
        hits = [p for p, text in bundles.items() if marker in text and (old in text or new in text)]
        if len(hits) != 1:
            print(f"error: OHIF bundle with {old.strip()!r} not found (or found twice) in {ohif}: "
                  f"monailabel {monailabel.__version__} is not the version this patch was written for", file=sys.stderr)
            return 1
        path = hits[0]
        text = bundles[path]
        if new in text:
            continue
        if text.count(old) != 1:
            print(f"error: {path}: {old.strip()!r} found {text.count(old)} times", file=sys.stderr)
            return 1
        bundles[path] = text.replace(old, new)
        with atomic_file(path, ".js") as tmp:  # an interrupted setup never leaves a half-written bundle
            Path(tmp).write_text(bundles[path], encoding="utf-8")
        print(f"patched {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
