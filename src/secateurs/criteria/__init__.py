"""Criteria: score targets (higher means keep). Registered by name; see
:func:`available_criteria`."""

from __future__ import annotations

from .base import Criterion, available_criteria, get_criterion, register_criterion
from .data import Contribution, DataCriterion, Taylor
from .weight import Clipping, Magnitude, Random

__all__ = [
    "Clipping",
    "Contribution",
    "Criterion",
    "DataCriterion",
    "Magnitude",
    "Random",
    "Taylor",
    "available_criteria",
    "get_criterion",
    "register_criterion",
]
