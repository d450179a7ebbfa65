"""ThresholdAdapter: the clipping threshold raised, held and rolled back from metrics."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from conftest import train_steps
from secateurs import Pruner
from secateurs.controllers import Decision, ThresholdAdapter
from secateurs.criteria import Clipping
from secateurs.schedules import Linear


def adapter_and_pruner(model: nn.Module, patience: int = 1,
                       optimizer: torch.optim.Optimizer | None = None,
                       ) -> tuple[ThresholdAdapter, Pruner]:
    adapter = ThresholdAdapter(Linear(0.0, 0.4, end_step=8), baseline=0.9, tolerance=0.05,
                               patience=patience)
    pruner = Pruner(model, None, Clipping(threshold=adapter.threshold, margin=0.0),
                    update_every=1, optimizer=optimizer)
    adapter.attach(pruner)
    return adapter, pruner


def play(adapter: ThresholdAdapter, pruner: Pruner, metrics: Sequence[float]) -> list[str]:
    out = []
    for metric in metrics:
        for _ in range(2):
            pruner.step()
        out.append(adapter.observe(metric).value)
    return out


def test_threshold_rises_is_held_and_is_rolled_back_step_by_step(mlp: nn.Module) -> None:
    adapter, pruner = adapter_and_pruner(mlp)
    assert adapter.resolution == pytest.approx(0.008)  # 2% of the highest threshold
    assert play(adapter, pruner, [0.9, 0.9]) == ["advance", "advance"]
    assert adapter.level(pruner.step_count) == pytest.approx(0.2)
    # The criterion reads the adapter's threshold (margin 0: prune and regrow alike).
    assert pruner.criterion.thresholds(pruner.step_count) == pytest.approx((0.2, 0.2))
    saved = copy.deepcopy(adapter.saved)
    assert play(adapter, pruner, [0.5, 0.5]) == ["pause", "rollback"]
    assert pruner.step_count == saved["step"]
    assert adapter.ceiling == pytest.approx(0.25)    # 0.2 + 0.5 * (0.3 - 0.2)
    assert play(adapter, pruner, [0.9]) == ["raise"]  # 0.25 met: half-way to 0.3
    assert adapter.ceiling == pytest.approx(0.275)


def test_the_clipped_weights_follow_the_threshold(mlp: nn.Module) -> None:
    adapter, pruner = adapter_and_pruner(mlp)
    play(adapter, pruner, [0.9, 0.9, 0.9])
    threshold = adapter.level(pruner.step_count - 1)  # what the last update used
    for target in pruner.targets:
        w = target.param.detach()
        assert bool(((w == 0) | (w.abs() >= threshold)).all())
    assert pruner.sparsity() > 0.3


def test_a_permissive_budget_reaches_the_schedule_end(mlp: nn.Module) -> None:
    opt = torch.optim.SGD(mlp.parameters(), lr=0.01, momentum=0.9)
    adapter, pruner = adapter_and_pruner(mlp, optimizer=opt)
    decisions = []
    for epoch in range(6):
        train_steps(mlp, opt, 2, pruner.step, seed=epoch)
        decisions.append(adapter.observe(1.0))
    assert decisions[-1] == Decision.HOLD and Decision.DONE in decisions
    outcome = adapter.finish()
    assert outcome.level == pytest.approx(0.4) and outcome.rollbacks == 0
    assert "ThresholdAdapter: ended at level 0.4" in outcome.message


def test_a_negative_threshold_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="must stay finite and >= 0"):
        ThresholdAdapter(Linear(-0.1, 0.2, end_step=4), baseline=0.9, tolerance=0.01)
