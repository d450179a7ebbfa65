"""Lightning with :class:`secateurs.integrations.lightning.PruningCallback`: real
``lightning``, a tiny module, a few steps on a CPU."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from secateurs.controllers import Budget  # noqa: E402
from secateurs.integrations.lightning import PruningCallback  # noqa: E402
from secateurs.schedules import Cubic  # noqa: E402

EPOCHS, STEPS_PER_EPOCH = 3, 5  # 10 batches an epoch, two per optimizer step


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                               weight_decay=1e-2)


def loader(n: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=4, shuffle=False)


def callback() -> PruningCallback:
    budget = Budget(Cubic(0.0, 0.8, begin_step=0, end_step=10), baseline=10.0, tolerance=10.0,
                    metric="val_loss", higher_is_better=False)
    return PruningCallback(budget.sparsity, controller=budget, update_every=2)


def fit(out: Path, prune: PruningCallback, ckpt_path: str | None = None
        ) -> tuple[Module, Any]:
    pl.seed_everything(0, verbose=False)
    module = Module()
    saver = pl.callbacks.ModelCheckpoint(dirpath=out, every_n_epochs=1, save_top_k=-1,
                                         save_on_train_epoch_end=True)
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[prune, saver], accumulate_grad_batches=2,
                         num_sanity_val_steps=0, limit_val_batches=2, log_every_n_steps=1,
                         deterministic=True)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*(num_workers|does not have many|dirpath has changed).*")
        trainer.fit(module, loader(40), loader(8), ckpt_path=ckpt_path)
    return module, trainer


def test_lightning_prunes_resumes_and_ends_bit_for_bit(tmp_path: Path) -> None:
    full = callback()
    module, trainer = fit(tmp_path, full)
    pruner = full.pruner
    assert pruner is not None and pruner.step_count == EPOCHS * STEPS_PER_EPOCH
    assert pruner.sparsity() == pytest.approx(0.8, abs=0.01)
    opt = trainer.optimizers[0]
    for t in pruner.targets:
        mask = pruner.masks[t.name]
        assert torch.all(t.param[~mask] == 0.0)
        assert torch.all(opt.state[t.param]["momentum_buffer"][~mask] == 0.0)
    assert trainer.callback_metrics["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert "lr" in trainer.callback_metrics and "target_sparsity" in trainer.callback_metrics

    ckpt = tmp_path / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"  # mid-schedule
    assert ckpt.is_file()
    again = callback()
    resumed, _ = fit(tmp_path / "resumed", again, ckpt_path=str(ckpt))
    assert again.pruner is not None and again.pruner.step_count == EPOCHS * STEPS_PER_EPOCH
    for (k, a), b in zip(module.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], again.pruner.masks[name]), name


def test_a_training_recipe_drives_the_callback_like_the_pruners_arguments(
        tmp_path: Path) -> None:
    recipe = {"sparsity": 0.8, "schedule": {"end_step": 10}, "update_every": 2}
    prune = PruningCallback(recipe=recipe)
    module, _ = fit(tmp_path / "recipe", prune)
    by_hand, _ = fit(tmp_path / "by-hand", callback())
    assert prune.pruner is not None and prune.pruner.sparsity() == pytest.approx(0.8, abs=0.01)
    for (k, a), b in zip(module.state_dict().items(), by_hand.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(TypeError, match="the recipe sets criterion"):
        PruningCallback(criterion="taylor", recipe=recipe)
