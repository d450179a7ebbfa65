"""Controllers: read measured metrics and adjust learning rates, schedules or thresholds.

A controller exposes ``observe(metrics)`` (a mapping of metrics or the metric itself),
``state_dict()`` and ``load_state_dict()``. Each controller lives in its own module of
this package and is re-exported here:

- :class:`Plateau`: reduce the learning rate when the metric stops improving;
  :class:`PruneLR` couples a learning rate schedule to prune events (LR rewinding or a
  warm restart after each one);
- :class:`Budget`: advance sparsity while the metric stays within a budget of the
  baseline; pause, roll back and lower the target when it does not;
- :class:`ThresholdAdapter`: the same for the threshold of dynamic weight clipping;
- :func:`measure_sensitivity` and :class:`Sensitivity`: how far each layer alone can be
  pruned, and per-layer sparsities that meet an overall one (for :class:`Budget`);
- :class:`ControlledSchedule`: the schedule a controller hands to the pruner, whose value
  the controller decides.
"""

from __future__ import annotations

from secateurs.controllers.budget import Budget
from secateurs.controllers.coupling import PruneLR
from secateurs.controllers.level import (
    ControlledSchedule,
    Decision,
    LevelController,
    Observation,
    Outcome,
    read_metric,
)
from secateurs.controllers.plateau import Plateau
from secateurs.controllers.sensitivity import Sensitivity, measure_sensitivity
from secateurs.controllers.threshold import ThresholdAdapter

__all__ = ["Budget", "ControlledSchedule", "Decision", "LevelController", "Observation",
           "Outcome", "Plateau", "PruneLR", "Sensitivity", "ThresholdAdapter",
           "measure_sensitivity", "read_metric"]
