"""Sensitivity analysis: how much each layer alone can be pruned, and per-layer sparsities.

Each target is pruned alone, one shot and without training, at several sparsities, and
the model is evaluated; the other targets stay dense and the weights are restored after
each measurement. The curves say which layers are sensitive. :meth:`Sensitivity.allocate`
turns them into per-layer sparsities meeting an overall target while protecting the
sensitive layers, which a :class:`~secateurs.Pruner` (or a
:class:`~secateurs.controllers.Budget`) takes as a mapping::

    sens = measure_sensitivity(model, lambda m: task.evaluate(m)["accuracy"])
    print(text_table(*sens.table()))
    pruner = Pruner(model, sens.allocate(0.9), optimizer=opt)

This is the per-layer sensitivity scan of Han et al. (2015, "Learning both Weights and
Connections for Efficient Neural Networks", Fig. 5) and of NVIDIA Distiller.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..criteria import Criterion
from ..pruner import Pruner
from ..targets import TargetSpec, resolve_targets
from ..validation import boolean, instance, number, optional, sparsity
from .level import read_metric

__all__ = ["DEFAULT_SPARSITIES", "Sensitivity", "measure_sensitivity"]

#: Sparsities each target is pruned to by default.
DEFAULT_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)

Evaluate = Callable[[nn.Module], "float | Mapping[str, float]"]


@dataclass
class Sensitivity:
    """Measured metric of the model with each target alone pruned, at each sparsity.

    Attributes:
        baseline: Metric of the unpruned model.
        sparsities: The sparsities measured, increasing.
        metrics: Target name -> metric at each sparsity.
        sizes: Target name -> number of elements.
        metric: Name of the metric.
        higher_is_better: Direction of the metric.
        seconds: Wall time of the measurement.
    """

    baseline: float
    sparsities: tuple[float, ...]
    metrics: dict[str, list[float]]
    sizes: dict[str, int]
    metric: str = "accuracy"
    higher_is_better: bool = True
    seconds: float = field(default=0.0, compare=False)

    def drops(self, name: str) -> list[float]:
        """Damage at each sparsity: how much worse than the baseline (negative: better)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return [sign * (self.baseline - m) for m in self.metrics[name]]

    def _curve(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(damage, sparsity)`` points, damage made strictly increasing.

        Damage is the running maximum of the measured drops from 0 at sparsity 0 (pruning
        more never helps, so a measured gain is noise), plus ``1e-9 * sparsity`` so that
        flat stretches still order the sparsities.
        """
        xs = np.array([0.0, *self.sparsities])
        damage = np.maximum.accumulate(np.maximum(np.array([0.0, *self.drops(name)]), 0.0))
        return damage + 1e-9 * xs, xs

    def _at(self, level: float, cap: float) -> dict[str, float]:
        out = {}
        for name in self.metrics:
            damage, xs = self._curve(name)
            out[name] = min(float(np.interp(level, damage, xs)), cap)
        return out

    def _overall(self, shares: Mapping[str, float]) -> float:
        total = sum(self.sizes.values())
        return sum(self.sizes[n] * s for n, s in shares.items()) / total

    def max_overall(self, max_sparsity: float | None = None) -> float:
        """The highest overall sparsity :meth:`allocate` reaches (every target at its cap)."""
        cap = self._cap(max_sparsity)
        return self._overall(dict.fromkeys(self.metrics, cap))

    def _cap(self, max_sparsity: float | None) -> float:
        top = self.sparsities[-1]
        cap = optional(sparsity, "max_sparsity", max_sparsity)
        return top if cap is None else min(cap, top)

    def allocate(self, overall: float, *, max_sparsity: float | None = None) -> dict[str, float]:
        """Per-target sparsities whose element-weighted mean is ``overall``, equal damage.

        Each target gets the highest sparsity whose measured damage (interpolated linearly
        between measured points) is at most a common level ``d``, and ``d`` is found by
        bisection so that ``sum(n_i * s_i) / sum(n_i) = overall``. Sensitive targets thus
        keep more weights; the sparsities never decrease as ``overall`` grows, so masks
        stay nested under a rising overall schedule.

        Args:
            overall: The overall sparsity, in ``[0, 1)``.
            max_sparsity: Largest sparsity of any target (default: the largest measured).

        Returns:
            Target name -> sparsity.

        Raises:
            ArgumentTypeError: if ``overall`` or ``max_sparsity`` is not a number.
            ValueError: if ``overall`` or ``max_sparsity`` is outside ``[0, 1)``, or
                ``overall`` is above what the caps allow.
        """
        overall = sparsity("overall", overall)
        cap = self._cap(max_sparsity)
        most = self.max_overall(max_sparsity)
        if overall > most + 1e-12:
            raise ValueError(f"overall sparsity {overall:g} is above {most:.4g}, the most the "
                             f"per-target cap {cap:g} allows; measure higher sparsities")
        if overall == 0.0:
            return dict.fromkeys(self.metrics, 0.0)
        low, high = 0.0, max(float(self._curve(n)[0][-1]) for n in self.metrics) + 1.0
        for _ in range(200):
            mid = (low + high) / 2
            if mid in (low, high):
                break
            if self._overall(self._at(mid, cap)) >= overall:
                high = mid
            else:
                low = mid
        return self._at(high, cap)

    def table(self, *, allocation: Mapping[str, float] | None = None
              ) -> tuple[list[str], list[list[str]]]:
        """Header and rows: one row per target, its size and metric at each sparsity.

        Args:
            allocation: Per-target sparsities shown as a last column, if given.
        """
        header = ["target", "params", *[f"{s:.0%}" for s in self.sparsities]]
        if allocation is not None:
            header.append("allocated")
        rows = []
        for name, values in self.metrics.items():
            row = [name, f"{self.sizes[name]:,}", *[f"{v:.4f}" for v in values]]
            if allocation is not None:
                row.append(f"{allocation[name]:.1%}")
            rows.append(row)
        return header, rows

    def curves(self) -> dict[str, tuple[list[float], list[float]]]:
        """Target name -> ``(sparsities, metrics)``, starting at ``(0, baseline)``."""
        return {name: ([0.0, *self.sparsities], [self.baseline, *values])
                for name, values in self.metrics.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sensitivity:
        """The inverse of :meth:`to_dict`."""
        return cls(float(data["baseline"]), tuple(data["sparsities"]),
                   {k: list(v) for k, v in data["metrics"].items()},
                   {k: int(v) for k, v in data["sizes"].items()}, data["metric"],
                   bool(data["higher_is_better"]), float(data.get("seconds", 0.0)))


def _check_sparsities(sparsities: Sequence[float]) -> tuple[float, ...]:
    values = tuple(number(f"sparsities[{i}]", s) for i, s in enumerate(sparsities))
    # One message for the whole sequence: the range and the order are checked together.
    if not values or any(not 0.0 < s < 1.0 for s in values) \
            or any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"sparsities must be strictly increasing values in (0, 1), got "
                         f"{list(sparsities)!r}")
    return values


def measure_sensitivity(
    model: nn.Module,
    evaluate: Evaluate,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    criterion: str | Criterion = "magnitude",
    targets: TargetSpec = None,
    granularity: str = "element",
    metric: str = "accuracy",
    higher_is_better: bool = True,
    progress: bool = False,
) -> Sensitivity:
    """Prune each target alone at each sparsity, one shot, and evaluate the model.

    The weights are restored after each measurement, so the model ends as it began.

    Args:
        model: The trained model.
        evaluate: ``model -> metric`` (a number, or a mapping holding ``metric``).
        sparsities: Strictly increasing sparsities in ``(0, 1)``.
        criterion: Registered name or object scoring the weights (see :class:`Pruner`).
        targets: Which parameters (see :func:`secateurs.targets.resolve_targets`).
        granularity: ``element``, ``N:M`` or ``channel``.
        metric: Key read from a mapping returned by ``evaluate``.
        higher_is_better: Direction of the metric.
        progress: Show a progress bar.

    Returns:
        The :class:`Sensitivity` curves.

    Raises:
        ArgumentTypeError: (a ``TypeError`` and a ``ValueError``) for a sparsity that is not
            a number, a ``metric`` that is not a string or a ``higher_is_better`` that is
            not a bool.
        ValueError: on bad sparsities or targets, before the model is touched.
    """
    values = _check_sparsities(sparsities)
    metric = instance("metric", metric, str, "a metric name (str)")
    higher_is_better = boolean("higher_is_better", higher_is_better)
    resolved = resolve_targets(model, targets)
    start = time.perf_counter()
    baseline = read_metric(evaluate(model), metric)
    curves: dict[str, list[float]] = {}
    bar = tqdm(total=len(resolved) * len(values), desc="sensitivity", leave=False,
               disable=not progress, dynamic_ncols=True)
    for target in resolved:
        saved = target.param.detach().clone()
        curves[target.name] = []
        try:
            for s in values:
                with Pruner(model, {target.name: s}, criterion, granularity=granularity) as p:
                    p.update()
                curves[target.name].append(read_metric(evaluate(model), metric))
                with torch.no_grad():
                    target.param.copy_(saved)
                bar.update()
        finally:
            with torch.no_grad():
                target.param.copy_(saved)
    bar.close()
    sizes = {t.name: t.param.numel() for t in resolved}
    return Sensitivity(baseline, values, curves, sizes, metric, higher_is_better,
                       time.perf_counter() - start)

