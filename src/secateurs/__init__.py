"""secateurs: make neural networks smaller and faster while they train, or in one shot.

The top level holds the few names most programs need; everything else lives in its
subpackage (``secateurs.structured``, ``secateurs.export``, ``secateurs.search``, ...), which
is also reachable as an attribute of this package. Nothing is imported until it is first
used, so ``import secateurs`` and ``secateurs --help`` stay fast: the first use of
:class:`Pruner` imports torch, and scikit-learn or matplotlib are only imported by the
functions that need them.

Example:
    >>> import secateurs as sc
    >>> pruner = sc.Pruner(model, sparsity=sc.schedules.Cubic(0.0, 0.9, 100, 2000))
    >>> budget = sc.controllers.Budget(...)      # subpackages load on first use
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Top-level name -> module that defines it, imported on first use.
_EXPORTS: dict[str, str] = {
    "CheckpointError": "checkpoint",
    "Criterion": "criteria",
    "PruneReport": "oneshot",
    "Pruner": "pruner",
    "available_criteria": "criteria",
    "calibrate": "calibration",
    "clip_": "clipping",
    "compact_": "structured",
    "load": "checkpoint",
    "prune_": "oneshot",
    "prune_channels_": "structured",
    "register_criterion": "criteria",
    "save": "checkpoint",
}

#: Former top-level name -> its home now; it still works, with a ``DeprecationWarning``.
_DEPRECATED: dict[str, str] = {
    "Budget": "controllers",
    "Plateau": "controllers",
    "ThresholdAdapter": "controllers",
    "Sensitivity": "controllers",
    "measure_sensitivity": "controllers",
    "MaskSet": "masks",
    "Summary": "pruner",
    "TargetSummary": "pruner",
    "Target": "targets",
    "resolve_targets": "targets",
    "Reconstruction": "reconstruction",
    "count": "structured",
    "load_pruned": "export",
    "save_pruned": "export",
    "sparsify_": "export",
}

__all__ = [
    "CheckpointError",
    "Criterion",
    "PruneReport",
    "Pruner",
    "__version__",
    "available_criteria",
    "calibrate",
    "clip_",
    "compact_",
    "controllers",
    "criteria",
    "load",
    "prune_",
    "prune_channels_",
    "register_criterion",
    "save",
    "schedules",
]

if TYPE_CHECKING:  # what static analysis sees; at run time these load on first use
    from . import controllers, criteria, schedules
    from .calibration import calibrate
    from .checkpoint import CheckpointError, load, save
    from .clipping import clip_
    from .criteria import Criterion, available_criteria, register_criterion
    from .oneshot import PruneReport, prune_
    from .pruner import Pruner
    from .structured import compact_, prune_channels_


def _module(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{name}")


def _deprecated(name: str) -> Any:
    """The object a former top-level name refers to, with a warning naming its home."""
    home = f"{__name__}.{_DEPRECATED[name]}"
    warnings.warn(f"{__name__}.{name} is deprecated and will be removed; use {home}.{name}",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(home), name)


def _submodule(name: str) -> Any:
    """The subpackage or module ``secateurs.<name>``, imported now; ``None`` if none."""
    try:
        return _module(name)
    except ModuleNotFoundError as error:
        if error.name == f"{__name__}.{name}":
            return None
        raise


def __getattr__(name: str) -> Any:
    """Load a top-level name, a former one (with a warning) or a subpackage on first use."""
    if name in _EXPORTS:
        value = getattr(_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _DEPRECATED:
        return _deprecated(name)
    if not name.startswith("_"):
        module = _submodule(name)
        if module is not None:
            return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The kept names and every subpackage and module (not the deprecated names)."""
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return sorted({*__all__, *modules})
