"""Calibration of the grading probabilities, fitted on out-of-fold training predictions.

* Vertebra pathology: Platt scaling of the fused probability, ``sigmoid(a * logit(p) + b)`` with ``a > 0``:
  strictly increasing, so the decision at the stored threshold is unchanged (the threshold is mapped too).
* Disc grades: temperature scaling of the grade probabilities, ``softmax(log(p) / T)``: the ranking of the
  grades is unchanged; the grade itself is decided on the uncalibrated probabilities by the disc rule chosen
  out of fold, and the calibrated probabilities are what is reported.

The disc grade decision rules (:func:`disc_grade`, :func:`disc_grade_margin`) live here too: torch-free, for
the review stage and the writer process. Both calibrations are fitted by maximum likelihood on the out-of-fold
predictions the fusion model was trained from (``spinepath train grading``), never on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spinepath.core.levels import DISC_GRADES

_EPS = 1e-6


def logit(p: np.ndarray | float) -> np.ndarray:
    """Log-odds of ``p``, clipped to [1e-6, 1 - 1e-6] first (margins near 0 or 1 stay comparable)."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    """The logistic function, inverse of :func:`logit`."""
    return 1.0 / (1.0 + np.exp(-z))


def apply_platt(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """``sigmoid(a * logit(p) + b)``: a Platt map applied (``p`` clipped to [1e-6, 1 - 1e-6] first)."""
    return sigmoid(a * logit(p) + b)


def fit_platt(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood ``(a, b)`` of ``sigmoid(a * logit(p) + b)`` for binary labels ``y`` (``a`` kept > 0).

    Raises:
        ValueError: If ``y`` has one class only.

    """
    # scipy.optimize is imported only where a map is fitted (training), not at inference
    from scipy.optimize import minimize

    y = np.asarray(y, dtype=np.float64)
    if len(set(y.tolist())) < 2:
        raise ValueError("Platt scaling needs both classes in the out-of-fold labels")
    z = logit(p)

    def nll(w: np.ndarray) -> float:
        s = np.exp(w[0]) * z + w[1]
        return float(np.sum(np.logaddexp(0, s) - y * s))

    w = minimize(nll, np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9}).x
    return float(np.exp(w[0])), float(w[1])


def fit_temperature(y: np.ndarray, probs: np.ndarray) -> float:
    """Maximum-likelihood temperature ``T`` of ``softmax(log(probs) / T)`` for class indices ``y``."""
    # scipy.optimize is imported only where a map is fitted (training), not at inference
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=int)
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0))

    def nll(log_t: float) -> float:
        s = logp / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        ls = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
        return float(-ls[np.arange(len(y)), y].sum())

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


@dataclass
class Calibration:
    """Calibration maps of the grading outputs (``None``: the output is reported uncalibrated).

    Attributes:
        vertebra: Platt ``(a, b)`` on the fused vertebra probability.
        disc_temperature: Temperature of the disc grade probabilities.
        info: How and on what the maps were fitted.

    """

    vertebra: tuple[float, float] | None = None
    disc_temperature: float | None = None
    info: dict = field(default_factory=dict)

    def vertebra_probability(self, p: np.ndarray) -> np.ndarray:
        """Calibrated P(pathological) (identity without a map)."""
        p = np.asarray(p, dtype=np.float64)
        if self.vertebra is None:
            return p
        return apply_platt(p, *self.vertebra)

    def disc_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated ``(N, 5)`` grade probabilities (identity without a temperature)."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.disc_temperature is None or probs.size == 0:
            return probs
        s = np.log(np.clip(probs, _EPS, 1.0)) / self.disc_temperature
        s = s - s.max(axis=-1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(axis=-1, keepdims=True)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"vertebra": list(self.vertebra) if self.vertebra else None,
                "disc_temperature": self.disc_temperature, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict | None) -> Calibration | None:
        """Inverse of :meth:`to_dict` (None stays None)."""
        if not d:
            return None
        v = d.get("vertebra")
        return cls(tuple(v) if v else None, d.get("disc_temperature"), d.get("info", {}))


def disc_grade(prob: np.ndarray, decision: str = "argmax") -> np.ndarray:
    """0-based disc grades from ``(N, 5)`` probabilities.

    ``argmax`` takes the most probable grade. ``ordinal`` keeps Schmorl's node (v5) when it is the most
    probable, else rounds the expected grade over v1-v4 (renormalised), which respects the ordinal scale.
    """
    prob = np.asarray(prob, dtype=np.float64).reshape(-1, len(DISC_GRADES))
    am = prob.argmax(1)
    if decision == "argmax":
        return am
    p4 = prob[:, :4] / np.maximum(prob[:, :4].sum(1, keepdims=True), 1e-9)
    exp = np.rint(p4 @ np.arange(4)).astype(int)
    return np.where(am == 4, 4, exp)


def disc_grade_margin(prob: np.ndarray, decision: str = "argmax") -> float:
    """How far one disc's grade decision is from changing (see :func:`disc_grade`).

    ``argmax``: the gap between the two most probable grades (probability). ``ordinal``: the distance of the
    expected grade over v1-v4 from its rounding boundary (grades, 0-0.5); 0.5 when Schmorl's node decides.
    """
    prob = np.asarray(prob, dtype=np.float64).reshape(len(DISC_GRADES))
    if decision == "argmax":
        top = np.sort(prob)[::-1]
        return float(top[0] - top[1])
    if prob.argmax() == 4:
        return 0.5
    p4 = prob[:4] / max(prob[:4].sum(), 1e-9)
    exp = float(p4 @ np.arange(4))
    return float(abs(abs(exp - np.floor(exp)) - 0.5))


def fit_calibration(y_vertebra: np.ndarray, p_vertebra: np.ndarray, y_disc: np.ndarray, p_disc: np.ndarray,
                    fitted_on: str) -> Calibration:
    """Fit both maps on out-of-fold predictions.

    Args:
        y_vertebra: Vertebra labels (1 pathological).
        p_vertebra: Their fused probabilities (the fusion model's cross-validated predictions).
        y_disc: Disc grade indices (0-4).
        p_disc: Their ``(N, 5)`` grade probabilities.
        fitted_on: What the predictions are, for the record.

    """
    vert = fit_platt(y_vertebra, p_vertebra) if len(set(np.asarray(y_vertebra).tolist())) > 1 else None
    temp = fit_temperature(y_disc, p_disc) if len(y_disc) else None
    return Calibration(vert, temp, {"fitted_on": fitted_on, "n_vertebrae": int(len(y_vertebra)),
                                    "n_discs": int(len(y_disc))})
