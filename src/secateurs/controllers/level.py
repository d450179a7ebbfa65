"""The machinery of metric-driven controllers: a level advanced, held or rolled back.

:class:`LevelController` owns a level (a sparsity, a threshold) that a schedule raises
while a validation metric stays within a budget of a baseline; :class:`~.budget.Budget`
and :class:`~.threshold.ThresholdAdapter` are its two uses. It hands the level to the
:class:`~secateurs.Pruner` as a :class:`ControlledSchedule`, a schedule whose value it
controls, so the pruner needs no hook: it reads the schedule at every mask update.
"""

from __future__ import annotations

import bisect
import copy
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Protocol

import torch

from ..pruner import Pruner
from ..schedules import Schedule
from ..validation import ArgumentTypeError, boolean, instance, integer, number

__all__ = ["ControlledSchedule", "Decision", "LevelController", "Observation", "Outcome",
           "read_metric"]


class Stateful(Protocol):
    """Anything a rollback restores: it has ``state_dict`` and ``load_state_dict``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class Decision(str, Enum):
    """What a controller did on one observation."""

    ADVANCE = "advance"    #: within budget: the level keeps rising
    PAUSE = "pause"        #: fell outside: the level is held while the model recovers
    WAIT = "wait"          #: still outside, recovery evaluations remain
    RESUME = "resume"      #: back within budget after a pause: the level rises again
    ROLLBACK = "rollback"  #: did not recover: last state within budget restored, target lowered
    RAISE = "raise"        #: reached a lowered target within budget: try half-way to the failure
    DONE = "done"          #: the highest level within budget is found: the level stays
    HOLD = "hold"          #: observations after the search ended


def read_metric(metrics: Mapping[str, float] | float | torch.Tensor, key: str) -> float:
    """The value of ``key`` in ``metrics``, or ``metrics`` itself when it is a number.

    Raises:
        ValueError: if ``key`` is missing (naming the keys present) or the value is NaN.
        ArgumentTypeError: (a ``TypeError``) if ``metrics`` is neither a mapping nor a
            number.
    """
    value: object
    if isinstance(metrics, Mapping):
        if key not in metrics:
            raise ValueError(f"metrics lack {key!r}; got keys {sorted(metrics)}")
        value = metrics[key]
    else:
        value = metrics
    if isinstance(value, torch.Tensor):
        value = value.item()
    # Not validation.number: an infinite metric (a diverged loss) is a measurement to act
    # on, outside any budget, not a bad argument.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"metric {key!r} must be a real number, got "
                                f"{type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"metric {key!r} is NaN")
    return float(value)


@dataclass(frozen=True)
class Observation:
    """One observation of a controller: when, what was measured, and what it decided."""

    step: int
    metric: float
    level: float
    sparsity: float
    decision: str


@dataclass(frozen=True)
class Outcome:
    """Where a controller ended (see :meth:`LevelController.finish`).

    Attributes:
        level: The controlled value (sparsity or threshold) of the final state.
        sparsity: Realised sparsity of the final state.
        metric: Its measured metric (``nan`` when no evaluation met the budget).
        baseline: The baseline metric.
        limit: The worst metric within budget.
        rollbacks: How many rollbacks happened.
        failed: The lowest level seen outside the budget (``nan`` if none).
        message: One sentence saying all of it.
    """

    level: float
    sparsity: float
    metric: float
    baseline: float
    limit: float
    rollbacks: int
    failed: float
    message: str


class ControlledSchedule(Schedule):
    """A schedule whose value its controller decides: ``controller.value(step, name)``.

    What a controller (:class:`~secateurs.controllers.Budget`,
    :class:`~secateurs.controllers.ThresholdAdapter`) hands to the
    :class:`~secateurs.Pruner` or a criterion in place of a plain schedule: the pruner reads
    it at every mask update as it reads any schedule, and the controller advances, holds
    and rewinds it from measured metrics. It is therefore not a pure function of the step.

    Args:
        owner: The controller deciding the value.
        name: Which of the controller's values (a target name for per-target sparsities),
            or ``None`` for its single level.
    """

    def __init__(self, owner: LevelController, name: str | None = None) -> None:
        self._owner = owner
        self._name = name

    @property
    def owner(self) -> LevelController:
        """The controller deciding the value."""
        return self._owner

    @property
    def name(self) -> str | None:
        """Which of the controller's values this schedule gives (``None``: its level)."""
        return self._name

    def _value(self, step: int) -> float:
        return self._owner.value(step, self._name)

    def bounds(self) -> tuple[float, float]:
        return self._owner.value_bounds(self._name)

    def __repr__(self) -> str:
        which = "" if self._name is None else f"[{self._name!r}]"
        return f"{type(self._owner).__name__}({self._owner.schedule!r}){which}"


class LevelController:
    """Advance a level along a schedule while a metric stays within budget; else hold or undo.

    The level at pruner step ``t`` is ``min(ceiling, schedule(progress(t)))``, where
    ``progress`` counts the steps spent advancing. On each :meth:`observe`:

    - within budget: the state is saved (the *last state within budget*); pruning goes on.
      When the level has reached the ceiling, the search ends (:attr:`Decision.DONE`), or,
      if a higher level failed earlier, the ceiling rises half-way (``backoff``) towards it;
    - outside: progress is held (:attr:`Decision.PAUSE`) for up to ``patience`` further
      evaluations; if none comes back within budget, the last state within budget is
      restored bit for bit (masks, weights, optimizer and pruner state, and ``others``) and
      the ceiling is lowered to ``good + backoff * (failed - good)``. The search ends when
      the gap between the best level within budget and the lowest failed one is at most
      ``resolution``.

    This is a bisection on the final level, each probe trained from the last good state.

    Args:
        schedule: Non-decreasing schedule of the level against advancing steps.
        baseline: The metric of the unpruned model.
        tolerance: How far the metric may fall (rise, for a lower-is-better metric) below
            the baseline: an absolute amount, or a fraction of ``|baseline|`` if ``relative``.
        relative: Read ``tolerance`` as a fraction of the baseline.
        metric: Key read from the mapping given to :meth:`observe`.
        higher_is_better: Direction of the metric.
        patience: Evaluations outside the budget tolerated after a pause before a rollback.
        backoff: Where the new ceiling lies between the good and the failed level, in (0, 1).
        resolution: Smallest gap between good and failed levels worth another probe.

    Raises:
        ArgumentTypeError: (a ``TypeError`` and a ``ValueError``) for an argument of the
            wrong type, naming it.
        ValueError: on any argument out of range, naming it.
    """

    def __init__(self, schedule: Schedule, *, baseline: float, tolerance: float,
                 relative: bool = False, metric: str = "accuracy",
                 higher_is_better: bool = True, patience: int = 2, backoff: float = 0.5,
                 resolution: float = 0.01) -> None:
        self.schedule = instance("schedule", schedule, Schedule, "a secateurs Schedule")
        self.baseline = number("baseline", baseline)
        self.tolerance = number("tolerance", tolerance, low=0.0)
        self.relative = boolean("relative", relative)
        self.metric = instance("metric", metric, str, "a metric name (str)")
        self.higher_is_better = boolean("higher_is_better", higher_is_better)
        self.patience = integer("patience", patience, low=0)
        self.backoff = number("backoff", backoff, low=0.0, high=1.0, low_open=True,
                              high_open=True)
        self.resolution = number("resolution", resolution, low=0.0, low_open=True)
        self._pruner: Pruner | None = None
        self._others: tuple[Stateful, ...] = ()
        self.ceiling = schedule.bounds()[1]
        self.upper: float | None = None
        self.phase = "pruning"
        self._offset = 0
        self._frozen: int | None = None
        self._waited = 0
        self.rollbacks = 0
        self.history: list[Observation] = []
        self._good: dict[str, Any] | None = None

    # -- the budget --------------------------------------------------------------------

    @property
    def limit(self) -> float:
        """The worst metric within budget."""
        amount = self.tolerance * abs(self.baseline) if self.relative else self.tolerance
        return self.baseline - amount if self.higher_is_better else self.baseline + amount

    def within(self, metric: float) -> bool:
        """Whether ``metric`` is within budget of the baseline."""
        return metric >= self.limit if self.higher_is_better else metric <= self.limit

    # -- the controlled level ------------------------------------------------------------

    def progress(self, step: int) -> int:
        """Advancing steps counted at pruner step ``step``."""
        return self._frozen if self._frozen is not None else max(0, step - self._offset)

    def level(self, step: int) -> float:
        """The controlled level at pruner step ``step``."""
        return min(self.ceiling, float(self.schedule(self.progress(step))))

    def value(self, step: int, name: str | None = None) -> float:
        """What the controlled schedule named ``name`` gives at ``step`` (the level itself)."""
        return self.level(step)

    def value_bounds(self, name: str | None = None) -> tuple[float, float]:
        """Bounds of the controlled schedule named ``name``."""
        return self.schedule.bounds()

    def _now(self) -> int:
        if self._pruner is None:
            raise RuntimeError(f"{type(self).__name__}.attach(pruner) must come before "
                               "observe() and finish()")
        return self._pruner.step_count

    def _caught_up(self, level: float) -> bool:
        """Whether the masks now reflect ``level`` (the pruner updates every few steps)."""
        return True

    def _resync(self, now: int, level: float) -> None:
        """Continue along the schedule from the first progress reaching ``level``."""
        high = 1
        while float(self.schedule(high)) < level and high < 2**40:
            high *= 2
        steps = range(high + 1)
        first = bisect.bisect_left(steps, level, key=lambda p: float(self.schedule(p)))
        self._offset = now - min(first, high)
        self._frozen = None

    @property
    def saved(self) -> Mapping[str, Any] | None:
        """The last state within budget (``None`` before :meth:`attach`).

        Keys: ``step`` (the pruner's), ``progress``, ``level``, ``sparsity``, ``metric`` and
        ``states``: the state dicts of the model, the pruner, the optimizer (if the pruner
        has one) and the ``others`` given to :meth:`attach`, in that order.
        """
        return self._good

    # -- observing ----------------------------------------------------------------------

    def attach(self, pruner: Pruner, *others: Stateful) -> None:
        """Name what a rollback restores, and save the current state as within budget.

        Args:
            pruner: The pruner reading this controller's schedule; its model and optimizer
                are restored with it.
            others: Further objects restored on rollback (e.g. a learning rate scheduler).
        """
        self._pruner = pruner
        self._others = others
        self._good = self._snapshot(math.nan)

    def _stateful(self) -> list[Any]:
        assert self._pruner is not None
        objects: list[Any] = [self._pruner.model, self._pruner]
        if self._pruner.optimizer is not None:
            objects.append(self._pruner.optimizer)
        return objects + list(self._others)

    def _snapshot(self, metric: float) -> dict[str, Any]:
        now = self._now()
        assert self._pruner is not None
        return {"step": now, "progress": self.progress(now), "level": self.level(now),
                "sparsity": self._pruner.sparsity(), "metric": metric,
                "states": [copy.deepcopy(o.state_dict()) for o in self._stateful()]}

    def _restore(self) -> None:
        assert self._good is not None
        for obj, state in zip(self._stateful(), self._good["states"], strict=True):
            obj.load_state_dict(copy.deepcopy(state))
        self._offset = self._good["step"] - self._good["progress"]
        self._frozen = None

    def observe(self, metrics: Mapping[str, float] | float) -> Decision:
        """Record a validation metric and act on it.

        Args:
            metrics: A mapping holding :attr:`metric`, or the metric itself.

        Returns:
            The decision taken (see :class:`Decision`).

        Raises:
            RuntimeError: before :meth:`attach`.
            ValueError: if the metric is missing or NaN.
        """
        value = read_metric(metrics, self.metric)
        now = self._now()
        level = self.level(now)
        if self.within(value):
            self._good = self._snapshot(value)
            decision = self._on_within(now, level)
        else:
            decision = self._on_outside(now, level)
        assert self._pruner is not None
        self.history.append(Observation(now, value, level, self._pruner.sparsity(),
                                        decision.value))
        return decision

    def _on_within(self, now: int, level: float) -> Decision:
        if self.phase == "done":
            return Decision.HOLD
        resumed = self.phase == "recovering"
        if resumed:
            self.phase, self._waited = "pruning", 0
            self._offset, self._frozen = now - self.progress(now), None
        if level < self.ceiling or not self._caught_up(level):
            return Decision.RESUME if resumed else Decision.ADVANCE
        if self.upper is None or self.upper - level <= self.resolution + 1e-12:
            self._end(now, level)
            return Decision.DONE
        self.ceiling = level + self.backoff * (self.upper - level)
        self._resync(now, level)
        return Decision.RAISE

    def _on_outside(self, now: int, level: float) -> Decision:
        if self.phase == "done":
            return Decision.HOLD
        if self.phase == "pruning":
            self.phase, self._waited = "recovering", 0
            self._frozen = self.progress(now)
            if self.patience > 0:
                return Decision.PAUSE
        else:
            self._waited += 1
            if self._waited < self.patience:
                return Decision.WAIT
        return self._rollback(level)

    def _rollback(self, failed: float) -> Decision:
        assert self._good is not None
        self.rollbacks += 1
        self.upper = failed if self.upper is None else min(self.upper, failed)
        self._restore()
        good = self._good["level"]
        self.phase, self._waited = "pruning", 0
        if self.upper - good <= self.resolution + 1e-12:
            self._end(self._now(), good)
        else:
            self.ceiling = good + self.backoff * (self.upper - good)
        return Decision.ROLLBACK

    def _end(self, now: int, level: float) -> None:
        self.phase = "done"
        self.ceiling = level
        self._frozen = self.progress(now)

    # -- ending -------------------------------------------------------------------------

    def finish(self) -> Outcome:
        """Restore the last state within budget unless it is the current one; say where.

        Returns:
            The :class:`Outcome`, whose ``message`` states the level reached, its metric, the
            baseline and the budget.
        """
        assert self._good is not None
        if self._now() != self._good["step"]:
            self._restore()
        self._end(self._now(), self._good["level"])
        good = self._good
        failed = math.nan if self.upper is None else self.upper
        return Outcome(good["level"], good["sparsity"], good["metric"], self.baseline,
                       self.limit, self.rollbacks, failed, self._message(good, failed))

    def _message(self, good: Mapping[str, Any], failed: float) -> str:
        name = type(self).__name__
        budget = f"{self.metric} {self.limit:.4g} (baseline {self.baseline:.4g}, " \
                 f"tolerance {self.tolerance:g}{' relative' if self.relative else ''})"
        if math.isnan(good["metric"]):
            return (f"{name}: no evaluation met the budget of {budget}; restored the state "
                    f"at attach (sparsity {good['sparsity']:.1%}).")
        tail = "" if math.isnan(failed) else f"; level {failed:.4g} failed"
        return (f"{name}: ended at level {good['level']:.4g} (sparsity {good['sparsity']:.1%})"
                f" with {self.metric} {good['metric']:.4g}, within the budget of {budget}: "
                f"the highest level that met it ({self.rollbacks} rollbacks{tail}).")

    # -- checkpointing ---------------------------------------------------------------------

    _KEYS = ("ceiling", "upper", "phase", "_offset", "_frozen", "_waited", "rollbacks",
             "_good")

    def state_dict(self) -> dict[str, Any]:
        """The decision state, the history and the last state within budget (tensors)."""
        state = {key.lstrip("_"): copy.deepcopy(getattr(self, key)) for key in self._KEYS}
        state["history"] = [asdict(o) for o in self.history]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the attached objects are restored by their owners).

        Raises:
            KeyError: naming any missing key.
        """
        missing = [k.lstrip("_") for k in self._KEYS if k.lstrip("_") not in state]
        if missing or "history" not in state:
            raise KeyError(f"state lacks {missing + ([] if 'history' in state else ['history'])}")
        for key in self._KEYS:
            setattr(self, key, copy.deepcopy(state[key.lstrip("_")]))
        self.history = [Observation(**o) for o in state["history"]]


