"""Exported networks: TorchScript beside the saved weights, loaded without the code that defines the network.

``spinepath export`` writes ``<name>.ts`` beside each bundle model ``<name>.pt`` (as the MONAI model-zoo bundles
ship ``models/model.ts``): the networks of that file scripted with TorchScript, their weights kept in fp16 like
the ``.pt``, and a ``spinepath.json`` extra file naming the SHA-256 of the ``.pt`` it was exported from. A loader
uses the export only while that digest matches (a retrained ``.pt`` makes its old export stale: it is ignored
and the eager network is built instead). Loading an export imports neither MONAI's networks nor torchvision or
timm, which is most of a cold start (issue 15); the pre- and post-processing stay in Python. The parity with the
eager networks is tested (``tests/test_exported.py``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from spinepath.core.files import atomic_file

log = logging.getLogger(__name__)

#: The suffix of an exported model file.
SUFFIX = ".ts"
#: The extra file of an export that records where it came from.
META_FILE = "spinepath.json"


def export_path(weights: str | Path) -> Path:
    """Where the export of a ``.pt`` file lives: beside it, same stem, :data:`SUFFIX`."""
    return Path(weights).with_suffix(SUFFIX)


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file (computed once per process while its size and modification time are unchanged)."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Networks(nn.Module):
    """Named lists of networks in one module (one file per ``.pt``): ``nets[name][i]``."""

    def __init__(self, nets: dict[str, list[nn.Module]]) -> None:
        super().__init__()
        self.nets = nn.ModuleDict({k: nn.ModuleList(v) for k, v in nets.items()})


def save_export(nets: dict[str, list[nn.Module]], source: str | Path, meta: dict | None = None,
                examples: dict[str, torch.Tensor] | None = None) -> Path:
    """Script the networks of ``source`` (a ``.pt``) and write them beside it, weights in fp16, atomically.

    Args:
        nets: Name -> networks in eval mode, scripted with :func:`torch.jit.script`.
        source: The ``.pt`` file the networks were loaded from (its digest goes into the export).
        meta: More JSON-serialisable facts to keep in the export.
        examples: Name -> an example input: those networks are traced on it instead (networks that TorchScript
            cannot compile, like MONAI's DynUNet with deep supervision; only for networks without
            data-dependent control flow: the parity tests check other input sizes).

    Returns:
        The export's path.

    """
    examples = examples or {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: parity-tested
        # copies: the export's fp16 cast must not reach the caller's networks
        nets = {k: [torch.jit.trace(copy.deepcopy(n).eval(), examples[k]) if k in examples else copy.deepcopy(n).eval()
                    for n in v] for k, v in nets.items()}
    module = Networks(nets).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(module).half()  # fp16 on disk, as the .pt; loaders cast back to float32
    info = {"source": Path(source).name, "source_sha256": file_digest(source), "names": list(nets), **(meta or {})}
    out = export_path(source)
    with atomic_file(out, SUFFIX) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(tmp), _extra_files={META_FILE: json.dumps(info)})
    return out


def export_meta(source: str | Path) -> dict | None:
    """The meta of the current export of ``source`` (a ``.pt``), read without loading its networks; else None.

    None when there is no export, it cannot be read, or it was made from another version of ``source``.
    """
    path = export_path(source)
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as z:  # a TorchScript file is a zip archive: <root>/extra/<name>
            name = next(n for n in z.namelist() if n.endswith(f"/extra/{META_FILE}"))
            meta = json.loads(z.read(name))
    except (OSError, StopIteration, ValueError, zipfile.BadZipFile):
        return None
    return meta if meta.get("source_sha256") == file_digest(source) else None


def load_export(source: str | Path,
                device: str | torch.device = "cpu") -> tuple[dict[str, list[nn.Module]], dict] | None:
    """The exported networks of a ``.pt`` file (float32, eval mode), or None without a current export.

    Returns:
        ``({name: [network, ...]}, meta)``; None when there is no export beside ``source`` or it was exported
        from another version of it (its recorded digest differs).

    """
    path = export_path(source)
    if not path.is_file():
        return None
    meta = export_meta(source)
    if meta is None:
        log.warning("%s is stale or unreadable (not exported from this %s): using the eager network", path.name,
                    Path(source).name)
        return None
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, and still works
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location=device)
    module = module.float().eval()
    nets = {name: list(getattr(module.nets, name).children()) for name in meta["names"]}
    return nets, meta
