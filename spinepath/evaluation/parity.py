"""Whether two runs of the chain gave the same findings (exported vs eager networks, CPU vs GPU, mixed precision).

Results are the JSON of :meth:`spinepath.core.results.DetectionResult.to_dict` or ``vertebrae.json``. Keys that
change from run to run whatever the models compute (:data:`VOLATILE`) are left out.
"""

from __future__ import annotations

import math

#: Keys whose values change from run to run (stage timings).
VOLATILE = frozenset({"timings", "timings_s", "seconds"})


def differences(a, b, tol: float = 1e-3, path: str = "") -> list[str]:
    """Where two JSON-like results differ: floats beyond ``tol``, anything else (labels, flags, counts) not equal.

    ``tol=math.inf`` compares the findings alone: every field but the floats.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a if k not in VOLATILE for d in differences(a[k], b[k], tol, f"{path}.{k}" if path else k)]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, tol, f"{path}[{i}]")]
    numbers = all(isinstance(x, float | int) and not isinstance(x, bool) for x in (a, b))
    if numbers and (isinstance(a, float) or isinstance(b, float)):
        return [] if abs(a - b) <= tol else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def float_kind(path: str) -> str:
    """A float field's kind by its key path: ``box_px``, ``box_mm``, ``probability``, ``measurement``, ``other``."""
    p = path.lower()
    if "box" in p:
        return "box_mm" if "mm" in p else "box_px"
    if any(w in p for w in ("prob", "score", "confidence")):
        return "probability"
    if any(w in p for w in ("_mm", "ratio", "deg", "index")):
        return "measurement"
    return "other"


def _floats(obj, path: str = "") -> dict[str, float]:
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() if k not in VOLATILE
                for k2, v2 in _floats(v, f"{path}.{k}" if path else str(k)).items()}
    if isinstance(obj, list | tuple):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _floats(v, f"{path}[{i}]").items()}
    return {path: obj} if isinstance(obj, float) else {}


def compare(ref: dict, run: dict) -> dict:
    """``run`` against ``ref``: the same findings? and the largest float differences.

    Returns:
        ``same_findings`` (every non-float field equal), ``n_changed`` and ``changed`` (the first 20 fields that
        differ), ``max_abs_diff``: per :func:`float_kind`, the largest difference and where it is.

    """
    changed = differences(ref, run, tol=math.inf)
    a, b = _floats(ref), _floats(run)
    worst: dict[str, tuple[float, str]] = {}
    for k in a.keys() & b.keys():
        d, kind = abs(a[k] - b[k]), float_kind(k)
        if d > worst.get(kind, (-1.0, ""))[0]:
            worst[kind] = (d, k)
    return {"same_findings": not changed, "n_changed": len(changed), "changed": changed[:20],
            "max_abs_diff": {k: {"diff": round(v[0], 6), "at": v[1]} for k, v in sorted(worst.items())}}
