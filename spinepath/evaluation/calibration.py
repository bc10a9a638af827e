"""Reliability of probabilities: expected calibration error (ECE) and reliability-diagram bins."""

from __future__ import annotations

import numpy as np


def reliability(confidence, outcome, n_bins: int = 10) -> dict:
    """ECE and equal-width bins of ``confidence`` against the observed rate of ``outcome`` (0/1).

    For a binary output pass P(positive) and the label; for a multi-class output its top-label confidence
    and whether the top label was right (:func:`top_label`).

    Returns:
        ``{"n", "ece", "bins": [{"range", "n", "mean_confidence", "accuracy"}]}`` (``accuracy``: the observed
        rate in the bin).

    """
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(outcome, dtype=np.float64).reshape(-1)
    if conf.size == 0:
        return {"n": 0, "ece": None, "bins": []}
    edges = np.linspace(0, 1, n_bins + 1)
    bins, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf >= lo) & ((conf < hi) if hi < 1 else (conf <= hi))
        if m.any():
            bins.append({"range": [round(float(lo), 2), round(float(hi), 2)], "n": int(m.sum()),
                         "mean_confidence": round(float(conf[m].mean()), 4), "accuracy": round(float(ok[m].mean()), 4)})
            ece += m.mean() * abs(conf[m].mean() - ok[m].mean())
    return {"n": int(conf.size), "ece": round(float(ece), 4), "bins": bins}


def top_label(y, probs) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence of the most probable class, whether it is the true class)`` of ``(N, K)`` probabilities."""
    p = np.asarray(probs, dtype=np.float64).reshape(len(y), -1)
    return p.max(axis=1), (p.argmax(axis=1) == np.asarray(y)).astype(float)


def plot_reliability(curves: dict[str, dict], path, title: str, xlabel: str = "predicted probability",
                     ylabel: str = "observed frequency") -> None:
    """Reliability diagram PNG of one or more :func:`reliability` results."""
    # matplotlib is imported only where a figure is drawn (Agg backend set first)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, rep in curves.items():
        b = rep.get("bins", [])
        ece = rep.get("ece")
        ax.plot([x["mean_confidence"] for x in b], [x["accuracy"] for x in b], "o-",
                label=f"{name} (n={rep['n']}, ECE {ece:.3f})" if ece is not None else name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
