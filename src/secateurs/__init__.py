"""secateurs: make neural networks smaller and faster while they train, or in one shot."""

from __future__ import annotations

from . import (
    calibration,
    checkpoint,
    controllers,
    criteria,
    distributed,
    export,
    lr,
    report,
    schedules,
    search,
    selection,
    sensitivity,
    structured,
    tasks,
    train,
)
from .calibration import calibrate
from .checkpoint import CheckpointError, load, save
from .clipping import clip_
from .controllers import Budget, Plateau, ThresholdAdapter
from .criteria import Criterion, available_criteria, register_criterion
from .export import load_pruned, save_pruned, sparsify_
from .masks import MaskSet
from .oneshot import PruneReport, prune_
from .pruner import Pruner, Summary, TargetSummary
from .reconstruction import Reconstruction
from .sensitivity import Sensitivity, measure_sensitivity
from .structured import compact_, count, prune_channels_
from .targets import Target, resolve_targets

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "CheckpointError",
    "Criterion",
    "MaskSet",
    "Plateau",
    "PruneReport",
    "Pruner",
    "Reconstruction",
    "Sensitivity",
    "Summary",
    "Target",
    "TargetSummary",
    "ThresholdAdapter",
    "__version__",
    "available_criteria",
    "calibrate",
    "calibration",
    "checkpoint",
    "clip_",
    "compact_",
    "controllers",
    "count",
    "criteria",
    "distributed",
    "export",
    "load",
    "load_pruned",
    "lr",
    "measure_sensitivity",
    "prune_",
    "prune_channels_",
    "register_criterion",
    "report",
    "resolve_targets",
    "save",
    "save_pruned",
    "schedules",
    "search",
    "selection",
    "sensitivity",
    "sparsify_",
    "structured",
    "tasks",
    "train",
]
