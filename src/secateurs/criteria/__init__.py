"""Criteria: score targets (higher means keep). Registered by name; see
:func:`available_criteria`.

- :mod:`.base`: the :class:`Criterion` interface and its declared capabilities, the
  :class:`GroupCriterion` base, the registry;
- :mod:`.weight`: ``magnitude``, ``random``, ``clipping`` (from the weights alone);
- :mod:`.data`: ``contribution``, ``taylor`` (from calibration or training data);
- :mod:`.group`: ``l1``, ``l2``, ``bn_scale`` (whole channel groups).
"""

from __future__ import annotations

from .base import Criterion, GroupCriterion, available_criteria, get_criterion, register_criterion
from .data import Contribution, DataCriterion, Taylor
from .group import BNScale, GroupL1, GroupL2, bn_penalty
from .weight import Clipping, Magnitude, Random

__all__ = [
    "BNScale",
    "Clipping",
    "Contribution",
    "Criterion",
    "DataCriterion",
    "GroupCriterion",
    "GroupL1",
    "GroupL2",
    "Magnitude",
    "Random",
    "Taylor",
    "available_criteria",
    "bn_penalty",
    "get_criterion",
    "register_criterion",
]
