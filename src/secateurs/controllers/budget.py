"""Budget: prune as far as a validation metric allows, and no further.

A :class:`Budget` owns the sparsity the :class:`~secateurs.Pruner` reads: a schedule whose
progress the controller advances while the validation metric stays within a budget of a
baseline, holds when it falls outside, and rewinds when the model does not recover::

    budget = Budget(Cubic(0.0, 0.95, 0, 2000, frequency=50), baseline=0.94, tolerance=0.01)
    pruner = Pruner(model, budget.sparsity, update_every=50, optimizer=opt)
    budget.attach(pruner)                       # what a rollback restores
    for epoch in range(epochs):
        train_one_epoch(callbacks=[lambda step: pruner.step()])
        budget.observe({"accuracy": validate(model)})
    print(budget.finish().message)             # the highest sparsity that met the budget

The same machinery, over a clipping threshold instead of a sparsity, is
:class:`~secateurs.controllers.ThresholdAdapter`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..schedules import Schedule
from .level import ControlledSchedule, LevelController

__all__ = ["Allocation", "Budget"]

Allocation = Callable[[float], Mapping[str, float]]


class Budget(LevelController):
    """Sparsity steered by a metric budget: "lose at most 1 point of accuracy".

    Give :attr:`sparsity` to the :class:`~secateurs.Pruner`; it is a schedule (one overall
    sparsity, the same for every target) or, with ``allocation``, a mapping target name ->
    schedule, the per-layer sparsities the allocation derives from the overall one (e.g.
    :meth:`secateurs.controllers.Sensitivity.allocate`). See :class:`LevelController` for
    the decisions.

    Args:
        schedule: Non-decreasing overall sparsity against advancing steps, in ``[0, 1)``
            (e.g. ``Cubic(0.0, 0.95, 0, 2000, frequency=50)``).
        allocation: ``overall -> {target: sparsity}``, non-decreasing in ``overall``.
        **options: ``baseline``, ``tolerance`` and the other options of
            :class:`LevelController`.
    """

    def __init__(self, schedule: Schedule, *, allocation: Allocation | None = None,
                 **options: Any) -> None:
        super().__init__(schedule, **options)
        low, high = schedule.bounds()
        if not (low >= 0.0 and high < 1.0):
            raise ValueError(f"the sparsity schedule must stay in [0, 1), got {schedule!r} "
                             f"spanning [{low:g}, {high:g}]")
        self.allocation = allocation
        self._shares: dict[float, Mapping[str, float]] = {}
        self.names = None if allocation is None else list(self._share(high))

    def _share(self, level: float) -> Mapping[str, float]:
        assert self.allocation is not None
        if level not in self._shares:
            if len(self._shares) > 512:
                self._shares.clear()
            self._shares[level] = dict(self.allocation(level))
        return self._shares[level]

    @property
    def sparsity(self) -> ControlledSchedule | dict[str, ControlledSchedule]:
        """What the pruner reads: one schedule, or target name -> schedule (each a
        :class:`~secateurs.controllers.level.ControlledSchedule`)."""
        if self.names is None:
            return ControlledSchedule(self)
        return {name: ControlledSchedule(self, name) for name in self.names}

    def value(self, step: int, name: str | None = None) -> float:
        level = self.level(step)
        return level if name is None else self._share(level)[name]

    def value_bounds(self, name: str | None = None) -> tuple[float, float]:
        low, high = self.schedule.bounds()
        if name is None:
            return low, high
        return self._share(low)[name], self._share(high)[name]

    def _caught_up(self, level: float) -> bool:
        # The pruner recomputes masks only every ``update_every`` steps: the level counts as
        # reached once the masks were last computed for the current targets.
        assert self._pruner is not None
        return self._pruner.caught_up()
