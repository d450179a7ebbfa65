"""The Hugging Face ``Trainer`` with :class:`secateurs.integrations.hf.PruningCallback`: real
``transformers``, a tiny model, a few steps on a CPU."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from secateurs.controllers import Budget  # noqa: E402
from secateurs.integrations.hf import RECIPE_FILE, STATE_FILE, PruningCallback  # noqa: E402
from secateurs.recipes import RecipeError, TrainingRecipe  # noqa: E402
from secateurs.schedules import Cubic  # noqa: E402

STEPS, SAVE_AT = 12, 6


class Tiny(nn.Module):
    """What the Trainer needs of a model: a forward that returns a loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 4))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def data(n: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(16, generator=g), "labels": int(torch.randint(0, 4, (), generator=g))}
            for _ in range(n)]


def trainer(out: Path, callback: PruningCallback) -> Any:
    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1, save_steps=SAVE_AT,
        logging_steps=2, eval_strategy="steps", eval_steps=SAVE_AT, report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    # 40 samples: 5 optimizer steps an epoch, so the checkpoint at step 6 is mid-epoch.
    return transformers.Trainer(model=Tiny(), args=args, train_dataset=data(40),
                                eval_dataset=data(8), callbacks=[callback])


def callback() -> PruningCallback:
    budget = Budget(Cubic(0.0, 0.8, begin_step=0, end_step=10), baseline=10.0, tolerance=10.0,
                    metric="eval_loss", higher_is_better=False)
    return PruningCallback(budget.sparsity, controller=budget, update_every=2)


def test_the_trainer_prunes_resumes_and_ends_bit_for_bit(tmp_path: Path) -> None:
    full = callback()
    run = trainer(tmp_path, full)
    run.train()
    pruner = full.pruner
    assert pruner is not None and pruner.step_count == STEPS  # once per optimizer step
    assert pruner.sparsity() == pytest.approx(0.8, abs=0.01)
    inner = run.optimizer.optimizer  # Accelerate's wrapper holds torch's AdamW
    for t in pruner.targets:
        mask = pruner.masks[t.name]
        assert torch.all(t.param[~mask] == 0.0)
        assert torch.all(inner.state[t.param]["exp_avg"][~mask] == 0.0)
        assert torch.all(inner.state[t.param]["exp_avg_sq"][~mask] == 0.0)
    logged = [h for h in run.state.log_history if "sparsity" in h]
    assert logged and "learning_rate" in logged[0] and "target_sparsity" in logged[0]
    assert logged[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert (tmp_path / f"checkpoint-{SAVE_AT}" / STATE_FILE).is_file()

    again = callback()
    resumed = trainer(tmp_path, again)
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{SAVE_AT}"))
    assert again.pruner is not None and again.pruner.step_count == STEPS
    for (k, a), b in zip(run.model.state_dict().items(),
                         resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], again.pruner.masks[name]), name

    elsewhere = tmp_path / "moved"
    shutil.copytree(tmp_path / f"checkpoint-{SAVE_AT}", elsewhere)
    (tmp_path / f"checkpoint-{SAVE_AT}" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="schedule would restart"):
        trainer(tmp_path, callback()).train(
            resume_from_checkpoint=str(tmp_path / f"checkpoint-{SAVE_AT}"))
    moved = callback()
    moved.resume_from = elsewhere
    trainer(tmp_path, moved).train(resume_from_checkpoint=str(elsewhere))
    assert moved.pruner is not None and moved.pruner.step_count == STEPS
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], moved.pruner.masks[name]), name


def test_tensorboard_records_the_sparsity_when_the_callback_comes_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    prune = PruningCallback(0.5)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
        save_strategy="no", report_to=["tensorboard"], use_cpu=True, disable_tqdm=True)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    run = transformers.Trainer(model=Tiny(), args=args, train_dataset=data(16))
    run.callback_handler.callbacks.insert(0, prune)  # before the TensorBoard reporter
    run.train()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/sparsity", "train/target_sparsity", "train/learning_rate"} <= set(
        events.Tags()["scalars"])
    assert events.Scalars("train/sparsity")[-1].value == pytest.approx(0.5, abs=0.01)


RECIPE = """
criterion: magnitude
sparsity: 0.8
schedule: {kind: cubic, begin_step: 0, end_step: 10}
update_every: 2
"""


def test_a_training_recipe_file_drives_the_callback_and_is_saved_with_each_checkpoint(
        tmp_path: Path) -> None:
    path = tmp_path / "prune.yaml"
    path.write_text(RECIPE)
    prune = PruningCallback(recipe=path)
    run = trainer(tmp_path / "out", prune)
    run.train()
    assert prune.pruner is not None and prune.pruner.sparsity() == pytest.approx(0.8, abs=0.01)
    saved = TrainingRecipe.from_yaml(tmp_path / "out" / f"checkpoint-{SAVE_AT}" / RECIPE_FILE)
    assert saved == TrainingRecipe.from_yaml(path)
    # The same pruning as the Pruner's arguments say (the Budget only watches here).
    by_hand = callback()
    run_by_hand = trainer(tmp_path / "by-hand", by_hand)
    run_by_hand.train()
    for (k, a), b in zip(run.model.state_dict().items(),
                         run_by_hand.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_a_wrong_recipe_fails_when_the_callback_is_made_not_mid_training(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="field 'schedule.end_step' is required"):
        PruningCallback(recipe={"schedule": {"begin_step": 3}})
    with pytest.raises(TypeError, match="the recipe sets sparsity, update_every"):
        PruningCallback(0.5, recipe={}, update_every=3)
    budget = Budget(Cubic(0.0, 0.8, begin_step=0, end_step=10), baseline=1.0, tolerance=0.1)
    with pytest.raises(TypeError, match="Budget steers sparsity through its own schedule"):
        PruningCallback(recipe={}, controller=budget)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        PruningCallback(recipe=tmp_path / "absent.yaml")
