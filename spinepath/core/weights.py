"""Network weights as stored: floating-point tensors in fp16 on disk, float32 once loaded.

Works on any mapping of tensors (a ``state_dict``) without importing torch.
"""

from __future__ import annotations


def half_state(state: dict) -> dict:
    """The state dict with its floating-point tensors in fp16 (the stored form; integers are kept)."""
    return {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}


def float_state(state: dict) -> dict:
    """The state dict with its floating-point tensors in float32 (to load a stored fp16 model)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
