"""Accelerate: a pruner for what ``accelerator.prepare`` returned, gradient accumulation,
and ``save_state`` / ``load_state`` resuming bit for bit (real ``accelerate``, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

from secateurs import Pruner  # noqa: E402
from secateurs.integrations.accelerate import prepare_pruner  # noqa: E402
from secateurs.schedules import Cubic  # noqa: E402

STEPS, SAVE_AT, ACCUMULATE = 12, 5, 2


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 16, generator=g), torch.randint(0, 4, (4,), generator=g))
            for _ in range(STEPS * ACCUMULATE)]


def run(out: Path, resume: bool = False, recipe: object = None
        ) -> tuple[nn.Module, Pruner, torch.optim.Optimizer]:
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model, opt = accelerator.prepare(model, opt)
    if recipe is None:
        pruner = prepare_pruner(accelerator, model, opt,
                                Cubic(0.0, 0.8, begin_step=0, end_step=10), update_every=2)
    else:
        pruner = prepare_pruner(accelerator, model, opt, recipe=recipe)
    data = batches()
    start = 0
    if resume:
        accelerator.load_state(str(out))
        start = SAVE_AT * ACCUMULATE
    for i, (x, y) in enumerate(data[start:], start):
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            pruner.step()
            if not resume and i + 1 == SAVE_AT * ACCUMULATE:
                accelerator.save_state(str(out))
    return model, pruner, opt


def test_accelerate_prunes_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    model, pruner, opt = run(tmp_path)
    assert pruner.step_count == STEPS and pruner.sparsity() == pytest.approx(0.8, abs=0.01)
    assert pruner.optimizer is opt and isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
    for t in pruner.targets:
        mask = pruner.masks[t.name]
        assert mask.device == t.param.device
        assert torch.all(t.param[~mask] == 0.0)
        assert torch.all(opt.optimizer.state[t.param]["exp_avg"][~mask] == 0.0)
    resumed, again, _ = run(tmp_path, resume=True)
    assert again.step_count == STEPS
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], again.masks[name]), name


def test_a_training_recipe_prepares_the_same_pruner(tmp_path: Path) -> None:
    model, pruner, _ = run(tmp_path / "arguments")
    recipe = {"sparsity": 0.8, "schedule": {"end_step": 10}, "update_every": 2}
    same, again, _ = run(tmp_path / "recipe", recipe=recipe)
    assert [t.name for t in again.targets] == [t.name for t in pruner.targets]
    for (k, a), b in zip(model.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
