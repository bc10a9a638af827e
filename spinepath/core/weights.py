"""Network weights as stored: floating-point tensors in fp16 on disk, float32 once loaded.

Works on any mapping of tensors (a ``state_dict``) without importing torch.
"""

from __future__ import annotations


def half_state(state: dict, device: str | None = None) -> dict:
    """The state dict with its floating-point tensors in fp16 (the stored form; integers are kept).

    Entries that are one tensor under two names (a module registered twice, as MONAI's DynUNet registers its
    input block among its skip layers) stay one tensor, so that a saved file holds it once. ``device``: also
    move the tensors there (e.g. ``"cpu"`` before saving), keeping that sharing.
    """
    out, done = {}, {}
    for k, v in state.items():
        key = (str(v.device), v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if key not in done:
            w = v.half() if v.is_floating_point() else v
            done[key] = w if device is None else w.to(device)
        out[k] = done[key]
    return out


def float_state(state: dict) -> dict:
    """The state dict with its floating-point tensors in float32 (to load a stored fp16 model)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
