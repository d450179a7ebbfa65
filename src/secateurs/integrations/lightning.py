"""Pruning inside Lightning: one callback (``pip install 'secateurs[lightning]'``).

Example:
    >>> callback = PruningCallback(sc.schedules.Cubic(0.0, 0.8, 0, 1000), update_every=50)
    >>> trainer = lightning.pytorch.Trainer(max_steps=2000, callbacks=[callback])
    >>> trainer.fit(module, loader)                 # or ckpt_path="last" to resume
    >>> callback.pruner.sparsity()
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from ..criteria import Criterion
from ..pruner import Pruner, SparsitySpec
from ._session import Session

__all__ = ["PruningCallback"]


class PruningCallback(pl.Callback):
    """A Lightning ``Callback`` that prunes the ``LightningModule`` while it trains.

    - ``on_train_start`` (the optimizer exists and, on resume, the checkpoint's weights and
      optimizer state are loaded): builds the :class:`~secateurs.Pruner` on the module and
      ``trainer.optimizers[0]``, and restores the pruner's state from the checkpoint.
    - ``on_train_batch_end``: ``pruner.step()`` when an optimizer step happened in the batch
      (``trainer.global_step`` moved), so once per optimizer step under
      ``accumulate_grad_batches``; logs ``sparsity``, ``target_sparsity`` and ``lr``.
    - ``on_validation_end``: feeds ``trainer.callback_metrics`` to ``controller``.
    - ``state_dict`` / ``load_state_dict``: the pruner's (and the controller's) state,
      saved in every Lightning checkpoint, so ``trainer.fit(..., ckpt_path=...)`` goes on
      with the schedule where it stopped.

    The gradient masking of the pruner works inside Lightning's optimizer closure, and the
    weights and optimizer state are zeroed when masks change (see
    :meth:`secateurs.Pruner.step`). With several optimizers, the first is the pruner's.

    Args:
        sparsity: The pruner's ``sparsity``.
        criterion: The pruner's ``criterion`` (default ``magnitude``).
        recipe: Instead of ``sparsity``, ``criterion`` and the options it sets: a
            :class:`~secateurs.recipes.TrainingRecipe`, a mapping of its fields or the path
            of its YAML file, checked here, before training starts.
        controller: Fed the validation metrics after each validation (``observe``); a
            :class:`~secateurs.controllers.Budget` is attached to the pruner (give the pruner
            its schedule: ``sparsity=budget.sparsity``).
        log: Log the sparsity and learning rate with ``pl_module.log`` (at the trainer's
            ``log_every_n_steps``).
        **options: Further arguments of :class:`~secateurs.Pruner` (``scope``,
            ``granularity``, ``update_every``, ``targets``, ...).

    Attributes:
        pruner: The pruner (``None`` until training starts).
    """

    def __init__(self, sparsity: SparsitySpec = None, criterion: str | Criterion | None = None,
                 *, recipe: Any = None, controller: Any = None, log: bool = True,
                 **options: Any) -> None:
        self.session = Session(sparsity, criterion, controller, options, recipe)
        self.log = log
        self._steps = 0  # trainer.global_step when the pruner last stepped

    @property
    def pruner(self) -> Pruner | None:
        return self.session.pruner

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        pruner = self.session.pruner
        if pruner is None or pruner.model is not pl_module:
            self.session.build(pl_module, optimizers[0] if optimizers else None)
        elif optimizers and pruner.optimizer is not optimizers[0]:
            pruner.optimizer = optimizers[0]  # a second fit made a new optimizer
        self._steps = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._steps:
            return  # an accumulation micro-batch, or a skipped step
        self._steps = trainer.global_step
        self.session.step()
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        if self.log and trainer.global_step % every == 0:
            values = self.session.logs()
            pruner = self.session.built()
            if pruner.optimizer is not None:
                values["lr"] = float(pruner.optimizer.param_groups[0]["lr"])
            for name, value in values.items():
                pl_module.log(name, value, on_step=True, on_epoch=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session.pruner is None or trainer.sanity_checking:
            return
        self.session.observe({k: v for k, v in trainer.callback_metrics.items()
                              if isinstance(v, (int, float, torch.Tensor)) and
                              (not isinstance(v, torch.Tensor) or v.numel() == 1)})

    def state_dict(self) -> dict[str, Any]:
        return {} if self.session.pruner is None else self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:  # restored when the pruner is built, at on_train_start
            self.session.load_state_dict(state_dict)
