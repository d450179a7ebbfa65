"""Dynamic learning rate: schedules applied to any torch optimizer.

:class:`ScheduledLR` sets each param group's ``lr`` from a closed-form
:class:`~secateurs.schedules.Schedule`; :func:`lambda_lr` gives a
``torch.optim.lr_scheduler.LambdaLR`` driven by the same schedule; and
:func:`rewind_` applies LR rewinding (Renda et al. 2020) to either.

Call order, as in torch::

    optimizer.step()
    scheduler.step()
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CyclicLR,
    LambdaLR,
    LRScheduler,
    MultiplicativeLR,
    OneCycleLR,
)

from . import validation as check
from .schedules import Schedule, as_schedule

__all__ = ["ScheduledLR", "lambda_lr", "rewind_"]

_MODES = ("factor", "absolute")


def _set_lr(group: dict[str, Any], lr: float | torch.Tensor) -> None:
    """Set ``group["lr"]``, in place when it is a tensor (as torch's schedulers do)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(float(lr))
    else:
        group["lr"] = lr


def _group_lrs(optimizer: Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


class ScheduledLR:
    """Set every param group's learning rate from a schedule of the step.

    ``lr_t = base_lr * schedule(t) * scale`` in mode ``"factor"`` and
    ``lr_t = schedule(t) * scale`` in mode ``"absolute"``. ``base_lr`` is the
    group's ``initial_lr``, which is set to its ``lr`` if absent, as torch's
    schedulers do. The lr for ``t = 0`` is set at construction, without
    advancing the step; each :meth:`step` then advances ``t`` by one.

    ``scale`` is what a metric-driven controller (e.g.
    :class:`secateurs.controllers.Plateau`) multiplies; setting it takes effect
    immediately.

    Args:
        optimizer: Any torch optimizer.
        schedule: The schedule, or a float for a constant.
        mode: ``"factor"`` (schedule multiplies each group's base lr) or
            ``"absolute"`` (schedule is the lr).

    Raises:
        ArgumentTypeError: If ``optimizer`` is not a ``torch.optim.Optimizer``, or ``schedule``
            neither a schedule nor a number.
        ValueError: If ``mode`` is unknown.

    Example:
        >>> sched = ScheduledLR(opt, schedules.Cosine(1.0, 0.01, end_step=1000))
        >>> for batch in data:
        ...     loss(batch).backward(); opt.step(); sched.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Schedule | float,
        *,
        mode: Literal["factor", "absolute"] = "factor",
    ) -> None:
        self.optimizer = check.instance("optimizer", optimizer, Optimizer,
                                        "a torch.optim.Optimizer")
        self.mode = check.choice("mode", mode, _MODES)
        self.schedule = as_schedule(schedule, name="schedule")
        self._step = 0
        self._scale = 1.0
        self.base_lrs: list[float] = []
        self._last_lr: list[float] = []
        self._sync_groups()
        self._apply()

    @property
    def current_step(self) -> int:
        """The step ``t`` whose learning rate is set now."""
        return self._step

    @property
    def scale(self) -> float:
        """Multiplier on the scheduled learning rate, ``>= 0`` (1.0 at construction)."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = check.number("scale", value, low=0.0)
        self._apply()

    def lr_at(self, step: int) -> list[float]:
        """Return each group's learning rate at ``step`` with the current scale, setting nothing.

        Args:
            step: The step, ``>= 0``.

        Returns:
            One learning rate per param group.
        """
        value = self.schedule(step)
        if self.mode == "absolute":
            return [value * self._scale for _ in self.base_lrs]
        return [base_lr * value * self._scale for base_lr in self.base_lrs]

    def step(self) -> None:
        """Advance to the next step and set its learning rates; call after ``optimizer.step()``."""
        self._step += 1
        self._apply()

    def rewind(self, to_step: int = 0) -> None:
        """Rewind the schedule to ``to_step`` (LR rewinding) and set its learning rates.

        After a prune event, training continues with the learning rates of the
        schedule from ``to_step`` on, as in Renda, Frankle & Carbin (2020),
        "Comparing Rewinding and Fine-tuning in Neural Network Pruning". The
        ``scale`` is kept; set it to 1.0 to drop a controller's reductions.

        Args:
            to_step: The step to continue from, ``>= 0``.

        Raises:
            ValueError: If ``to_step`` is negative.
        """
        self._step = check.integer("to_step", to_step, low=0)
        self._apply()

    def get_last_lr(self) -> list[float]:
        """Return the learning rates last set, one per param group."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """Return the state needed for an exact resume: step, scale, base lrs and mode.

        The schedule is configuration, not state, and is not saved.
        """
        return {
            "step": self._step,
            "scale": self._scale,
            "base_lrs": list(self.base_lrs),
            "mode": self.mode,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` and set the learning rates it implies.

        Args:
            state_dict: A dict returned by :meth:`state_dict`.

        Raises:
            ValueError: If the mode or the number of param groups differs.
        """
        if state_dict["mode"] != self.mode:
            raise ValueError(
                f"state_dict has mode {state_dict['mode']!r}, this scheduler has {self.mode!r}"
            )
        base_lrs = [float(lr) for lr in state_dict["base_lrs"]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(
                f"state_dict has {len(base_lrs)} base lrs, the optimizer has "
                f"{len(self.optimizer.param_groups)} param groups"
            )
        self._step = check.integer("step", state_dict["step"], low=0)
        self.base_lrs = base_lrs
        for group, base_lr in zip(self.optimizer.param_groups, base_lrs, strict=True):
            group["initial_lr"] = base_lr
        self.scale = state_dict["scale"]

    def _sync_groups(self) -> None:
        """Record the base lr of any param group added since the last call."""
        for group in self.optimizer.param_groups[len(self.base_lrs) :]:
            group.setdefault("initial_lr", float(group["lr"]))
            self.base_lrs.append(float(group["initial_lr"]))

    def _apply(self) -> None:
        self._sync_groups()
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(self._step), strict=True):
            _set_lr(group, lr)
        self._last_lr = _group_lrs(self.optimizer)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(schedule={self.schedule!r}, mode={self.mode!r}, "
            f"step={self._step}, scale={self._scale})"
        )


def lambda_lr(optimizer: Optimizer, schedule: Schedule | float) -> LambdaLR:
    """Return torch's ``LambdaLR`` driven by ``schedule``: ``lr_t = base_lr * schedule(t)``.

    Equal to :class:`ScheduledLR` in mode ``"factor"``, with torch's conventions
    (it steps once at construction to ``last_epoch = 0``). The schedule is
    wrapped in a plain function so that the scheduler's ``state_dict`` holds no
    secateurs objects (``torch.load(weights_only=True)`` reads it).

    Args:
        optimizer: Any torch optimizer.
        schedule: The schedule of the factor, or a float for a constant.

    Returns:
        The ``LambdaLR``.
    """
    factor = as_schedule(schedule, name="schedule")

    def lr_lambda(step: int) -> float:
        return factor(step)

    return LambdaLR(optimizer, lr_lambda)


#: torch schedulers whose ``get_lr`` is a pure function of ``last_epoch``.
_PURE_GET_LR = (LambdaLR, CyclicLR, OneCycleLR)


def rewind_(scheduler: ScheduledLR | LRScheduler, to_step: int = 0) -> None:
    """Rewind a learning rate scheduler to ``to_step`` in place (LR rewinding).

    Renda, Frankle & Carbin (2020), "Comparing Rewinding and Fine-tuning in
    Neural Network Pruning": after pruning, retrain with the learning rates the
    schedule had from ``to_step`` on. The scheduler's next ``step()`` gives the
    lr of ``to_step + 1``.

    Supported:

    - :class:`ScheduledLR` (its :meth:`~ScheduledLR.rewind`);
    - any torch ``LRScheduler`` with a closed form (``_get_closed_form_lr``):
      ``StepLR``, ``MultiStepLR``, ``ConstantLR``, ``LinearLR``,
      ``ExponentialLR``, ``PolynomialLR``, ``CosineAnnealingLR``;
    - ``LambdaLR``, ``CyclicLR``, ``OneCycleLR``, whose ``get_lr`` is a pure
      function of ``last_epoch`` (cyclic momentum is rewound too);
    - ``MultiplicativeLR``, recomputed as ``base_lr * prod_{e=1..t} lambda(e)``.

    Not supported (``TypeError``): ``ReduceLROnPlateau`` (metric-driven, no
    function of the step), ``SequentialLR`` and ``ChainedScheduler`` (rewind
    their children instead), ``CosineAnnealingWarmRestarts`` and other
    schedulers with state beyond ``last_epoch``.

    Args:
        scheduler: The scheduler.
        to_step: The step to continue from, ``>= 0``.

    Raises:
        TypeError: If the scheduler is not supported.
        ValueError: If ``to_step`` is negative.
    """
    if isinstance(scheduler, ScheduledLR):
        scheduler.rewind(to_step)
        return
    step = check.integer("to_step", to_step, low=0)
    check.instance("scheduler", scheduler, LRScheduler, "a ScheduledLR or a torch LRScheduler")
    previous, scheduler.last_epoch = scheduler.last_epoch, step
    try:
        values = _rewound_lrs(scheduler, step)
    except TypeError:
        scheduler.last_epoch = previous
        raise
    for group, lr in zip(scheduler.optimizer.param_groups, values, strict=True):
        _set_lr(group, lr)
    scheduler._last_lr = [
        g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
        for g in scheduler.optimizer.param_groups
    ]


def _rewound_lrs(scheduler: LRScheduler, step: int) -> list[float | torch.Tensor]:
    """Return each group's lr for ``scheduler`` at ``last_epoch == step``."""
    closed_form = getattr(scheduler, "_get_closed_form_lr", None)
    if closed_form is not None:
        return list(closed_form())
    if isinstance(scheduler, _PURE_GET_LR):
        # get_lr warns unless called from step(); this flag is what step() sets.
        scheduler._get_lr_called_within_step = True
        try:
            return list(scheduler.get_lr())
        finally:
            scheduler._get_lr_called_within_step = False
    if isinstance(scheduler, MultiplicativeLR):
        values: list[float | torch.Tensor] = []
        for base_lr, lmbda in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            values.append(base_lr * math.prod(lmbda(e) for e in range(1, step + 1)))
        return values
    raise TypeError(
        f"cannot rewind {type(scheduler).__name__}: supported are ScheduledLR, torch "
        "schedulers with a closed form (StepLR, MultiStepLR, ConstantLR, LinearLR, "
        "ExponentialLR, PolynomialLR, CosineAnnealingLR), LambdaLR, CyclicLR, OneCycleLR "
        "and MultiplicativeLR"
    )
