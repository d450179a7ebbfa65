"""Reduce the learning rate when a metric stops improving."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from secateurs.controllers.level import read_metric
from secateurs.lr import ScheduledLR
from secateurs.validation import choice, instance, integer, number, optional

__all__ = ["Plateau"]

_STATE_KEYS = ("best", "num_bad_epochs", "cooldown_counter", "num_observations")


def _count(name: str, value: object) -> int:
    return integer(name, value, low=0)


def _non_negative(name: str, value: object) -> float:
    return number(name, value, low=0.0)


class Plateau:
    """Reduce the learning rate by ``factor`` when a metric has stopped improving.

    The decisions are those of ``torch.optim.lr_scheduler.ReduceLROnPlateau``:
    a metric is an improvement when it beats ``best`` by the threshold
    (``mode="max"``, ``threshold_mode="rel"``: ``metric > best * (1 + threshold)``;
    ``"abs"``: ``metric > best + threshold``; mirrored for ``mode="min"``);
    otherwise it counts as a bad epoch. Bad epochs during a cooldown are
    ignored. When there have been more than ``patience`` bad epochs in a row,
    the learning rate is reduced, the count restarts and the cooldown begins.

    The target is either

    - a :class:`~secateurs.lr.ScheduledLR`: its ``scale`` becomes
      ``max(scale * factor, min_scale)``, so the reduction composes with the
      schedule (``lr_t = base_lr * schedule(t) * scale``); or
    - a ``torch.optim.Optimizer``: each group's lr becomes
      ``max(lr * factor, min_lr)``.

    As in torch, a change smaller than ``eps`` is skipped.

    Args:
        target: The :class:`~secateurs.lr.ScheduledLR` or optimizer to act on.
        mode: ``"max"`` when higher metrics are better (accuracy), ``"min"`` (loss).
        factor: Multiplier applied on a reduction, in ``(0, 1)``.
        patience: Bad epochs tolerated before a reduction, ``>= 0``.
        threshold: Smallest change that counts as an improvement, ``>= 0``.
        threshold_mode: ``"rel"`` (relative to ``best``) or ``"abs"``.
        cooldown: Observations after a reduction during which bad epochs are ignored.
        min_scale: Lower bound on ``scale``; for a ScheduledLR target only.
        min_lr: Lower bound on each group's lr, a float or one per group; for an
            optimizer target only.
        eps: Smallest change applied, as torch's ``eps``.
        metric: Key read when :meth:`observe` is given a mapping of metrics (default
            ``"accuracy"`` in mode ``"max"``, ``"loss"`` in mode ``"min"``).

    Raises:
        TypeError: If ``target`` is neither a ScheduledLR nor an optimizer.
        ArgumentTypeError: (a ``TypeError`` and a ``ValueError``) for an argument of the
            wrong type (``patience="3"``), naming it.
        ValueError: If an argument is out of range, or a bound is given for the
            other kind of target.
    """

    def __init__(
        self,
        target: ScheduledLR | Optimizer,
        *,
        mode: Literal["min", "max"] = "max",
        factor: float = 0.5,
        patience: int = 3,
        threshold: float = 1e-4,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        min_scale: float = 0.0,
        min_lr: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
        metric: str | None = None,
    ) -> None:
        self.mode = choice("mode", mode, ("min", "max"))
        self.threshold_mode = choice("threshold_mode", threshold_mode, ("rel", "abs"))
        self.factor = number("factor", factor, low=0.0, high=1.0, low_open=True,
                             high_open=True)
        self.target = target
        self.patience = _count("patience", patience)
        self.threshold = _non_negative("threshold", threshold)
        self.cooldown = _count("cooldown", cooldown)
        self.min_scale = _non_negative("min_scale", min_scale)
        self.eps = _non_negative("eps", eps)
        named = optional(instance, "metric", metric, types=str, what="a metric name (str)")
        self.metric = named if named is not None else ("loss" if mode == "min" else "accuracy")
        self._init_min_lrs(target, min_lr)
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.num_observations = 0

    def _init_min_lrs(self, target: object, min_lr: float | Sequence[float]) -> None:
        """Check the target's kind against the bounds given, and store ``min_lr``."""
        self._default_min_lr: float | None = None
        if isinstance(target, ScheduledLR):
            if isinstance(min_lr, Sequence) or min_lr != 0.0:
                raise ValueError(
                    f"min_lr applies to an optimizer target, got {min_lr!r} for a "
                    "ScheduledLR target; bound its scale with min_scale"
                )
            self.min_lrs: list[float] = []
            return
        if not isinstance(target, Optimizer):
            raise TypeError(
                "target must be a secateurs.lr.ScheduledLR or a torch.optim.Optimizer, "
                f"got {type(target).__name__}"
            )
        if self.min_scale != 0.0:
            raise ValueError(
                f"min_scale applies to a ScheduledLR target, got {self.min_scale!r} for an "
                "optimizer target; bound its lr with min_lr"
            )
        groups = len(target.param_groups)
        if isinstance(min_lr, Sequence):
            if len(min_lr) != groups:
                raise ValueError(f"min_lr must have {groups} entries, one per group: {min_lr!r}")
            self.min_lrs = [_non_negative(f"min_lr[{i}]", v) for i, v in enumerate(min_lr)]
        else:
            self._default_min_lr = _non_negative("min_lr", min_lr)
            self.min_lrs = [self._default_min_lr] * groups

    def reset(self) -> None:
        """Forget the best metric, the bad-epoch count and the cooldown (a warm restart);
        the reductions already applied to the target stay."""
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    @property
    def in_cooldown(self) -> bool:
        """Whether bad epochs are being ignored after a recent reduction."""
        return self.cooldown_counter > 0

    def is_better(self, metric: float) -> bool:
        """Whether ``metric`` improves on ``best`` by more than the threshold."""
        if self.threshold_mode == "rel":
            if self.mode == "min":
                return metric < self.best * (1.0 - self.threshold)
            return metric > self.best * (1.0 + self.threshold)
        if self.mode == "min":
            return metric < self.best - self.threshold
        return metric > self.best + self.threshold

    def observe(self, metric: float | torch.Tensor | Mapping[str, float]) -> bool:
        """Record a metric and reduce the learning rate when it has plateaued.

        Args:
            metric: The metric, a float or a one-element tensor, or a mapping of metrics
                holding the key :attr:`metric`.

        Returns:
            True when a learning rate (or the scale) was reduced by this call.

        Raises:
            ValueError: If ``metric`` is NaN.
        """
        current = read_metric(metric, self.metric) if isinstance(metric, Mapping) \
            else float(metric)
        if math.isnan(current):
            raise ValueError(f"metric must not be NaN, got {metric!r}")
        self.num_observations += 1
        if self.is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs <= self.patience:
            return False
        self.cooldown_counter = self.cooldown
        self.num_bad_epochs = 0
        return self._reduce()

    def _reduce(self) -> bool:
        if isinstance(self.target, ScheduledLR):
            old = self.target.scale
            new = max(old * self.factor, self.min_scale)
            if old - new > self.eps:
                self.target.scale = new
                return True
            return False
        return self._reduce_optimizer(self.target)

    def _reduce_optimizer(self, optimizer: Optimizer) -> bool:
        groups = optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self._default_min_lr is None:
                raise RuntimeError(
                    f"the optimizer has {len(groups)} param groups but min_lr has "
                    f"{len(self.min_lrs)} entries; a group was added after construction"
                )
            self.min_lrs = [self._default_min_lr] * len(groups)
        reduced = False
        for group, min_lr in zip(groups, self.min_lrs, strict=True):
            old = float(group["lr"])
            new = max(old * self.factor, min_lr)
            if old - new > self.eps:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(new)
                else:
                    group["lr"] = new
                reduced = True
        return reduced

    def state_dict(self) -> dict[str, Any]:
        """Return the decision state: best, bad-epoch count, cooldown and observation count.

        The target's own state (lr or scale) is saved by its owner.
        """
        return {key: getattr(self, key) for key in _STATE_KEYS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Args:
            state_dict: A dict returned by :meth:`state_dict`.

        Raises:
            KeyError: If a key is missing.
        """
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise KeyError(f"state_dict lacks {missing}; expected keys {list(_STATE_KEYS)}")
        self.best = float(state_dict["best"])
        self.num_bad_epochs = _count("num_bad_epochs", state_dict["num_bad_epochs"])
        self.cooldown_counter = _count("cooldown_counter", state_dict["cooldown_counter"])
        self.num_observations = _count("num_observations", state_dict["num_observations"])
