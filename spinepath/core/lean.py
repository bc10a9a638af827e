"""Import only what runs: MONAI's package ``__init__`` files deferred in an inference process (issue 15).

``import monai.deploy.core`` runs ``monai/__init__.py`` first, and that imports every MONAI module (all networks,
transforms, datasets and, through them, torchvision and ``torch._dynamo``): about 6 s of a 10 s cold start on
2 cores, for code an inference process with exported networks never calls. :func:`defer_package_inits` installs
an import hook under which a package of ``monai`` is created without running its ``__init__``: its modules
import normally, and the ``__init__`` runs the first time a name that is not a submodule is asked of the
package (``from monai.utils import ensure_tuple``), so nothing that uses a package's exports breaks. Used by the
processes that only infer (the Deploy app, the PACS worker, batch workers); training and tests import MONAI as
usual.
"""

from __future__ import annotations

import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

#: The package trees whose ``__init__`` files are deferred. SciPy's optimisation package imports every solver
#: (0.1-0.2 s) for the one assignment the grouping solves (:mod:`spinepath.detection.grouping`).
ROOTS = ("monai", "scipy.optimize")
#: Names a deferred package exports, served from the module that defines them (without the package's
#: ``__init__``): MONAI's type conversion asks ``monai.data.MetaTensor`` on every tensor it converts.
PROVIDED = {("monai.data", "MetaTensor"): "monai.data.meta_tensor"}
#: Optional packages MONAI imports when installed and an inference process never uses (CuPy: MONAI's
#: ``type_conversion`` imports it, most of a second, for arrays this chain never makes; CUDA work is torch's).
HIDDEN = ("cupy", "cupyx")
#: LightGBM's optional integrations: ``lightgbm.compat`` imports each that is installed (scikit-learn alone is
#: half a second), and an inference process only calls ``Booster.predict``.
LIGHTGBM_OPTIONAL = ("sklearn", "pandas")


class _DeferredInit(importlib.abc.Loader):
    """Create the package module; run its real ``__init__`` on the first non-submodule attribute asked."""

    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        real = self.real

        def __getattr__(attr: str):  # noqa: N807  (the module-level hook of PEP 562)
            if attr.startswith("__"):
                raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}")
            name = f"{module.__name__}.{attr}"
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name != name:
                    raise
            if (module.__name__, attr) in PROVIDED:
                value = getattr(importlib.import_module(PROVIDED[module.__name__, attr]), attr)
                setattr(module, attr, value)
                return value
            del module.__getattr__  # a real export: run the package's own __init__ once
            real.exec_module(module)
            return getattr(module, attr)

        module.__getattr__ = __getattr__


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = roots

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if not any(name == r or name.startswith(r + ".") for r in self.roots):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.submodule_search_locations is not None and spec.loader is not None:
            spec.loader = _DeferredInit(spec.loader)
        return spec


def defer_if_exported(model_dir: str | Path | None = None) -> bool:
    """:func:`defer_package_inits` when every network of ``model_dir`` has a current export, else nothing.

    An eager network needs MONAI's packages initialised in their own order, so a process that may build one
    (a missing or stale export) imports MONAI as usual. ``model_dir`` as in
    :func:`spinepath.core.paths.model_files`.

    Returns:
        Whether the package initialisation is deferred.

    """
    # torch and the model paths only here: the hook must be installed before anything imports MONAI
    from spinepath.core.exported import export_meta
    from spinepath.core.paths import model_files

    if not all(p.is_file() and export_meta(p) is not None for p in model_files(model_dir)):
        return False
    import_lightgbm_core()
    return defer_package_inits()


def import_lightgbm_core() -> None:
    """Import LightGBM without its optional scikit-learn and pandas integrations (an inference process).

    Each of :data:`LIGHTGBM_OPTIONAL` not yet imported is hidden while ``lightgbm`` is imported, so that its
    compatibility layer finds it missing; the process can still import it afterwards. LightGBM's scikit-learn
    estimators are then unusable in this process; its ``Booster`` (what the fusion models are) is unchanged.
    """
    if "lightgbm" in sys.modules:
        return
    hidden = [m for m in LIGHTGBM_OPTIONAL if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # `import m` raises ImportError
    try:
        import lightgbm  # noqa: F401  (imported here, once, without the hidden packages)
    finally:
        for m in hidden:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]


def defer_package_inits(roots: tuple[str, ...] = ROOTS) -> bool:
    """Defer the package ``__init__`` files of those of ``roots`` not imported yet in this process.

    Also hides :data:`HIDDEN` from the process (imported by nothing that runs here).

    Returns:
        True when installed (or already installed), False when MONAI (or, without it in ``roots``, every root)
        was imported before: nothing changes.

    """
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return True
    pending = tuple(r for r in roots if r not in sys.modules)
    if not pending or ("monai" in roots and "monai" not in pending):
        return False
    sys.meta_path.insert(0, _Finder(pending))
    for m in HIDDEN:
        sys.modules.setdefault(m, None)  # type: ignore[arg-type]  # `import cupy` raises ImportError here
    if "monai" in pending:
        from monai._version import get_versions  # a plain module: MONAI's modules read monai.__version__

        sys.modules["monai"].__version__ = str(get_versions().get("version", "0+unknown"))
    return True


def one_study_gc() -> None:
    """Turn the cyclic garbage collector off in a process that runs one study and exits without teardown.

    Importing torch, MONAI and the Deploy SDK makes a heap of about a million objects, and the collector's passes
    over it (about 700 young, 65 middle and 6 full collections in a cold ``app.py``) took 0.35-0.55 s of a 4.5 s
    cold start. Reference counting still frees every acyclic object; the cycles left are freed with the process
    (peak memory unchanged within the noise: ``make bench``). Long-running processes keep the collector.
    """
    gc.disable()


def exit_without_teardown(code: int) -> NoReturn:
    """End a one-study process once its outputs are on disk: flush the streams and the logs, skip the teardown.

    The interpreter's teardown of a cold process (freeing the models and the executor) took about 1.4 s.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
