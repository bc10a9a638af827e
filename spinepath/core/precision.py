"""How the inference stages run their networks (issue 15): mixed precision on CUDA, one-shot graphs on the CPU.

Each network stage runs its forward passes under :func:`forward_context`. On CUDA that is :func:`autocast`:
float16 autocast for the stages in :func:`amp_stages`, plain float32 otherwise. The default set is the stages
whose findings on the real examples were the same with and without it on a GPU (``scripts/gpu_check.py``,
README "GPU"); ``$SPINEPATH_AMP`` overrides it: ``none``, ``all`` or a comma-separated list of :data:`STAGES`.
On the CPU (always float32) the exported TorchScript networks run without the graph executor's optimisation
passes (``torch.jit.optimized_execution(False)``): profiling a graph on its first call and optimising it on the
second cost a cold process 0.15-0.25 s over its few calls per network, for no gain in steady state on the CPU
(whose fuser is off): on the 19-slice example the first pass of the networks took 1.19-1.26 s with them,
1.00-1.04 s without, and later passes 0.97 against 0.90-0.93 s (2 cores; the same probabilities).
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


def forward_context(device: torch.device | str, stage: str, amp: bool = True) -> contextlib.AbstractContextManager:
    """The context of ``stage``'s forward passes on ``device`` (see the module docstring).

    On CUDA, :func:`autocast` when ``amp`` (the caller's network accepts it); on the CPU, TorchScript graphs run
    unoptimised. The setting is the calling thread's (the Deploy SDK's operators run in its executor's thread).
    """
    if torch.device(device).type == "cpu":
        return torch.jit.optimized_execution(False)
    return autocast(device, stage) if amp else contextlib.nullcontext()
