"""Orthanc plugin script (Debian ``orthanc-python``): every stable study goes into spinepath's queue.

Orthanc runs this file with its own Python (``"PythonScript"`` in its configuration). When a study has received
no new image for ``StableAge`` seconds, Orthanc reports it stable; the study's Orthanc ID and Study Instance UID
are added to the queue file named by ``"SpinepathQueue"`` in the configuration, where the worker
(``spinepath worker``) finds it, even if it is not running at that moment. Nothing else is done in Orthanc's
process; nothing about the patient is written. The results the worker stores back (spinepath's SR, SEG and PDF)
make the study stable again: the queue counts the study's source images (every series but spinepath's), and a
study already done is queued again only when that count changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import orthanc  # provided by Orthanc's Python plugin

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: spinepath.service.queue

from spinepath.service.queue import StudyQueue  # noqa: E402  (standard library only)

#: The manufacturer spinepath writes in its results (their series are not source images).
OWN_MANUFACTURER = "spinepath"

_config = json.loads(orthanc.GetConfiguration())
_queue = StudyQueue(_config["SpinepathQueue"])


def _source_instances(study_id: str) -> int:
    """How many images of the study are not spinepath's own results."""
    series = json.loads(orthanc.RestApiGet(f"/studies/{study_id}/series?expand"))
    return sum(len(s.get("Instances", [])) for s in series
               if s.get("MainDicomTags", {}).get("Manufacturer", "") != OWN_MANUFACTURER)


def on_change(change_type, level, resource_id) -> None:
    """Orthanc's change callback: queue each stable study."""
    if change_type != orthanc.ChangeType.STABLE_STUDY:
        return
    try:
        study = json.loads(orthanc.RestApiGet(f"/studies/{resource_id}"))
        uid = study["MainDicomTags"]["StudyInstanceUID"]
        added = _queue.add(resource_id, uid, _source_instances(resource_id))
        orthanc.LogWarning(f"spinepath: study {resource_id} {'queued' if added else 'already queued'}")
    except Exception as exc:  # noqa: BLE001  (a plugin error must not take Orthanc down)
        orthanc.LogError(f"spinepath: could not queue study {resource_id}: {exc}")


orthanc.RegisterOnChangeCallback(on_change)
