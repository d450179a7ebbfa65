"""Controllers: read measured metrics and adjust learning rates, schedules or thresholds.

A controller exposes ``observe(metric) -> bool`` (True when it acted),
``state_dict()`` and ``load_state_dict()``. Each controller lives in its own
module of this package and is re-exported here.
"""

from __future__ import annotations

from secateurs.controllers.plateau import Plateau

__all__ = ["Plateau"]
