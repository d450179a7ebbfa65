"""ThresholdAdapter: the clipping threshold of dynamic weight clipping, steered by a metric.

Dynamic weight clipping (the ``clipping`` criterion, splicing of Guo et al. 2016) zeroes
every weight with ``|w| < threshold`` at each mask update. Choosing the threshold by hand
is guesswork: too low prunes little, too high ruins the model. :class:`ThresholdAdapter`
raises it along a schedule while the validation metric stays within budget, holds it when
the metric falls outside, and rolls back and lowers it when the model does not recover,
exactly as :class:`~secateurs.controllers.Budget` does for a sparsity::

    adapter = ThresholdAdapter(Linear(0.0, 0.2, end_step=2000), baseline=0.94, tolerance=0.01)
    pruner = Pruner(model, None, Clipping(threshold=adapter.threshold), update_every=10,
                    optimizer=opt)
    adapter.attach(pruner)
    ...  # train, and adapter.observe(metrics) after each evaluation
    print(adapter.finish().message)
"""

from __future__ import annotations

from typing import Any

from ..schedules import Schedule
from ..validation import instance
from .level import ControlledSchedule, LevelController

__all__ = ["ThresholdAdapter"]


class ThresholdAdapter(LevelController):
    """Raise a clipping threshold while a metric stays within budget; hold or undo otherwise.

    The level is the threshold (the pruning threshold of :class:`~secateurs.criteria.Clipping`;
    its regrowth threshold stays ``threshold * (1 + margin)``). Decisions are those of
    :class:`LevelController`.

    Args:
        schedule: Non-decreasing threshold against advancing steps, ``>= 0``.
        resolution: Smallest gap between good and failed thresholds worth another probe;
            ``None`` for 2% of the schedule's highest value.
        **options: ``baseline``, ``tolerance`` and the other options of
            :class:`LevelController`.

    Raises:
        ValueError: if the schedule can go below zero, or on any other bad option.
    """

    def __init__(self, schedule: Schedule, *, resolution: float | None = None,
                 **options: Any) -> None:
        schedule = instance("schedule", schedule, Schedule, "a secateurs Schedule")
        low, high = schedule.bounds()
        if not 0.0 <= low <= high < float("inf"):
            raise ValueError(f"the threshold schedule must stay finite and >= 0, got "
                             f"{schedule!r} spanning [{low:g}, {high:g}]")
        if resolution is None:
            resolution = 0.02 * high if high > 0 else 1e-6
        super().__init__(schedule, resolution=resolution, **options)

    @property
    def threshold(self) -> ControlledSchedule:
        """The threshold schedule to give to :class:`~secateurs.criteria.Clipping`."""
        return ControlledSchedule(self)
