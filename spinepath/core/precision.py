"""Mixed precision on CUDA for the inference stages (issue 15).

Each network stage runs its forward pass under :func:`autocast`: float16 autocast on CUDA for the stages in
:func:`amp_stages`, plain float32 otherwise (always on the CPU). The default set is the stages whose findings
on the real examples were the same with and without it on a GPU (``scripts/gpu_check.py``, README "GPU").
``$SPINEPATH_AMP`` overrides it: ``none``, ``all`` or a comma-separated list of :data:`STAGES`.
"""

from __future__ import annotations

import contextlib
import os

import torch

#: The network stages that can autocast.
STAGES = ("detection", "classification", "degeneration", "segmentation")

#: Stages that autocast on CUDA by default (measured by ``scripts/gpu_check.py``: same findings, see README).
DEFAULT_AMP_STAGES: frozenset[str] = frozenset({"detection", "classification", "segmentation"})


def amp_stages() -> frozenset[str]:
    """The stages that autocast on CUDA: ``$SPINEPATH_AMP`` (``none`` / ``all`` / a list), else the default.

    Raises:
        ValueError: ``$SPINEPATH_AMP`` names an unknown stage.

    """
    env = os.environ.get("SPINEPATH_AMP", "").strip().lower()
    if not env:
        return DEFAULT_AMP_STAGES
    if env == "none":
        return frozenset()
    if env == "all":
        return frozenset(STAGES)
    names = frozenset(s.strip() for s in env.split(",") if s.strip())
    unknown = sorted(names - set(STAGES))
    if unknown:
        raise ValueError(f"SPINEPATH_AMP names unknown stage(s) {unknown}; expected none, all or some of {STAGES}")
    return names


def autocast(device: torch.device | str, stage: str) -> contextlib.AbstractContextManager:
    """Float16 autocast for ``stage`` when ``device`` is CUDA and the stage is in :func:`amp_stages`.

    Callers cast the outputs back to float32 before decisions are taken on them.
    """
    if torch.device(device).type == "cuda" and stage in amp_stages():
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
