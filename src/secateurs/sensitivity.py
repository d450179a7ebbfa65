"""Moved to :mod:`secateurs.controllers.sensitivity`; the names here warn and forward."""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = frozenset({"DEFAULT_SPARSITIES", "Evaluate", "Sensitivity", "measure_sensitivity"})


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"secateurs.sensitivity.{name} moved to "
                      f"secateurs.controllers.sensitivity.{name}", DeprecationWarning,
                      stacklevel=2)
        from .controllers import sensitivity

        return getattr(sensitivity, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_MOVED)
