"""secateurs: make neural networks smaller and faster while they train, or in one shot."""

from __future__ import annotations

from . import controllers, criteria, lr, report, schedules, selection, tasks, train
from .clipping import clip_
from .criteria import Criterion, available_criteria, register_criterion
from .masks import MaskSet
from .pruner import Pruner, Summary, TargetSummary
from .targets import Target, resolve_targets

__version__ = "0.1.0"

__all__ = [
    "Criterion",
    "MaskSet",
    "Pruner",
    "Summary",
    "Target",
    "TargetSummary",
    "__version__",
    "available_criteria",
    "clip_",
    "controllers",
    "criteria",
    "lr",
    "register_criterion",
    "report",
    "resolve_targets",
    "schedules",
    "selection",
    "tasks",
    "train",
]
