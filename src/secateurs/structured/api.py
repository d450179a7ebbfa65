"""One call from a trained model to a compacted one: channel pruning, then compaction."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import validation as check
from ..calibration import observe
from ..criteria import Criterion
from ..pruner import Pruner
from ..schedules import Cubic, Schedule
from ..targets import TargetSpec
from .compaction import check_compactable, compact_
from .counting import Counts, count

__all__ = ["StructuredResult", "prune_channels_"]


@dataclass(frozen=True)
class StructuredResult:
    """What :func:`prune_channels_` did.

    Attributes:
        model: The compacted model (the same object that was passed in).
        before: Counts of the dense model.
        after: Counts of the compacted model.
        units: Channel group -> ``(units before, units kept)``.
        seconds: Wall time of pruning (training steps included) and compaction.
        kept: Target name -> why its output channels stayed at full width.
    """

    model: nn.Module
    before: Counts
    after: Counts
    units: dict[str, tuple[int, int]]
    seconds: float
    kept: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"params {self.before.params:,} -> {self.after.params:,} "
                f"({self.before.params / max(1, self.after.params):.2f}x fewer), "
                f"MACs {self.before.macs:,} -> {self.after.macs:,} "
                f"({self.before.macs / max(1, self.after.macs):.2f}x fewer)"
                + (f"; {len(self.kept)} targets kept their output channels"
                   if self.kept else ""))


def prune_channels_(
    model: nn.Module,
    example_inputs: Any,
    sparsity: float | Schedule | Mapping[str, float | Schedule],
    criterion: str | Criterion = "l1",
    *,
    scope: str = "layer",
    targets: TargetSpec = None,
    train_step: Callable[[int], Any] | None = None,
    steps: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    update_every: int | None = None,
    calibration: Iterable[Any] | None = None,
    strict: bool = False,
) -> StructuredResult:
    """Remove whole channels, neurons and heads from ``model``, one-shot or while it trains.

    One-shot (``steps=0``): the groups are scored once (after a calibration pass over
    ``calibration`` for data-driven criteria) and the lowest removed. Gradual
    (``steps > 0``): ``train_step(step)`` runs ``steps`` times, each followed by
    ``pruner.step()``, with the sparsity rising on the cubic schedule of Zhu & Gupta 2017
    over the first three quarters of the steps (or on ``sparsity`` if it is a schedule).
    Then the pruned groups are compacted away, ``optimizer`` (if any) rebound.

    Args:
        model: A trained model; changed in place.
        example_inputs: Inputs the model can be called on; traced to find channel groups
            and used to check that compaction keeps the outputs.
        sparsity: Fraction of the units (channels, neurons, heads) of each group removed.
        criterion: ``l1``, ``l2``, ``bn_scale``, ``magnitude``, ``contribution``,
            ``taylor``, or a :class:`~secateurs.criteria.Criterion`.
        scope: ``layer`` (every group loses the same fraction) or ``global``.
        targets: See :func:`secateurs.targets.resolve_targets`.
        train_step: ``train_step(step)`` runs one optimisation step (gradual mode).
        steps: Training steps of the gradual mode; 0 for one-shot.
        optimizer: The optimizer ``train_step`` uses: its state is masked while pruning and
            rebound after compaction.
        update_every: Steps between mask updates (gradual); default ``steps // 20``.
        calibration: Batches for a calibration pass of a data-driven criterion (one-shot).
        strict: Refuse targets whose channel coupling cannot be resolved, instead of
            keeping their channels at full width (see :class:`~secateurs.Pruner`).

    Returns:
        A :class:`StructuredResult` with the compacted model and its counts.

    Raises:
        ValueError: on bad arguments, or a model whose channel groups cannot be compacted
            exactly (checked first, on a copy, so the model is left unchanged).

    Example:
        A structured run beside a dense one, with counts and measured latency::

            small = copy.deepcopy(trained)
            result = prune_channels_(small, x[:2], 0.5, "l1")
            dense_time, small_time = latency([trained, small], x)
            print(result.after.params, result.after.macs, small_time.ms, small_time.speedup)
    """
    check.integer("steps", steps, low=0)
    if steps and train_step is None:
        raise ValueError(f"steps={steps} needs a train_step(step) callable to train with")
    start = time.perf_counter()
    check_compactable(model, example_inputs)
    before = count(model, example_inputs)
    if steps and isinstance(sparsity, (int, float)):
        sparsity = Cubic(initial=0.0, final=float(sparsity), begin_step=0,
                         end_step=max(1, 3 * steps // 4))
    every = update_every if update_every is not None else max(1, steps // 20)
    with Pruner(model, sparsity, criterion, scope=scope, granularity="channel",
                update_every=every, optimizer=optimizer, targets=targets,
                example_inputs=example_inputs, strict=strict) as pruner:
        if train_step is not None and steps:
            for step in range(steps):
                train_step(step)
                pruner.step()
        else:
            _calibrate(pruner, calibration)
            pruner.update()
        masks = dict(pruner.masks)
        units = {g.name: (g.units, int((~g.off(masks)).sum())) for g in pruner.channel_groups}
        kept = pruner.kept_targets
    compact_(model, example_inputs, masks, optimizer=optimizer)
    return StructuredResult(model, before, count(model, example_inputs), units,
                            time.perf_counter() - start, kept)


def _calibrate(pruner: Pruner, calibration: Iterable[Any] | None) -> None:
    criterion = pruner.criterion
    if calibration is None:
        if criterion.request is not None:
            raise ValueError(f"criterion {criterion!r} learns from data: pass "
                             "calibration batches for a one-shot prune")
        return
    if criterion.request is None:
        raise ValueError(f"criterion {criterion!r} takes no calibration batches")
    criterion.fit(pruner.targets, observe(pruner.model, calibration, pruner.targets,
                                          criterion.request, progress=False))
