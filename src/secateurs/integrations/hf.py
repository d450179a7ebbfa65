"""Pruning inside the Hugging Face ``Trainer``: one callback (``pip install 'secateurs[hf]'``).

Example:
    >>> callback = PruningCallback(sc.schedules.Cubic(0.0, 0.8, 0, 1000), update_every=50)
    >>> trainer = transformers.Trainer(model, args, train_dataset=data, callbacks=[callback])
    >>> trainer.train()                                # or resume_from_checkpoint=True
    >>> callback.pruner.sparsity()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .. import checkpoint
from ..criteria import Criterion
from ..pruner import Pruner, SparsitySpec
from ._session import Session

__all__ = ["RECIPE_FILE", "STATE_FILE", "PruningCallback"]

#: The file, inside each of the Trainer's ``checkpoint-<step>`` folders, that holds the
#: pruner's state (a :func:`secateurs.save` checkpoint without the weights, which the
#: Trainer saves itself).
STATE_FILE = "secateurs_pruner.safetensors"
#: The file beside it that repeats the training recipe, when the callback was given one.
RECIPE_FILE = "secateurs_recipe.yaml"


class PruningCallback(TrainerCallback):
    """A ``TrainerCallback`` that prunes the model while the ``Trainer`` trains it.

    - ``on_train_begin``: builds the :class:`~secateurs.Pruner` on the Trainer's model and
      optimizer (the one inside Accelerate's wrapper); when the run resumes from a
      checkpoint, restores the pruner's (and the controller's) state from it, so the
      schedule goes on where it stopped.
    - ``on_optimizer_step`` (right after ``optimizer.step()``): ``pruner.step()``, once per
      optimizer step, whatever ``gradient_accumulation_steps``.
    - ``on_log``: adds ``sparsity`` and ``target_sparsity`` to the logs (the learning rate
      is the Trainer's ``learning_rate``); reporters called after this callback (and
      ``trainer.state.log_history``) get them: add it with
      ``trainer.callback_handler.callbacks.insert(0, callback)`` for every reporter
      (TensorBoard, Weights & Biases) to see them.
    - ``on_evaluate``: feeds the evaluation metrics (``eval_loss``, ``eval_accuracy``, ...)
      to ``controller``.
    - ``on_save``: writes the pruner's state as :data:`STATE_FILE` into the checkpoint
      folder just saved (and the recipe, if one was given, as :data:`RECIPE_FILE`).

    Args:
        sparsity: The pruner's ``sparsity``.
        criterion: The pruner's ``criterion`` (default ``magnitude``).
        recipe: Instead of ``sparsity``, ``criterion`` and the options it sets: a
            :class:`~secateurs.recipes.TrainingRecipe`, a mapping of its fields or the path
            of its YAML file, checked here, before training starts.
        controller: Fed the evaluation metrics after each evaluation (``observe``); a
            :class:`~secateurs.controllers.Budget` is attached to the pruner. Give the
            pruner its schedule (``sparsity=budget.sparsity``) and its metric with the
            Trainer's prefix (``metric="eval_accuracy"``).
        resume_from: The checkpoint folder to restore the pruner from when the Trainer
            resumes (default: ``<output_dir>/checkpoint-<global step>``, the folder
            ``trainer.train(resume_from_checkpoint=...)`` names in ``output_dir``).
        **options: Further arguments of :class:`~secateurs.Pruner` (``scope``,
            ``granularity``, ``update_every``, ``targets``, ...).

    Attributes:
        pruner: The pruner (``None`` until training starts).
    """

    def __init__(self, sparsity: SparsitySpec = None, criterion: str | Criterion | None = None,
                 *, recipe: Any = None, controller: Any = None,
                 resume_from: str | os.PathLike[str] | None = None,
                 **options: Any) -> None:
        self.session = Session(sparsity, criterion, controller, options, recipe)
        self.resume_from = None if resume_from is None else Path(resume_from)

    @property
    def pruner(self) -> Pruner | None:
        return self.session.pruner

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("the Trainer passed no model to on_train_begin")
        self.session.build(model, optimizer)
        if state.global_step > 0:  # resumed from a checkpoint
            folder = self.resume_from or _folder(args, state)
            self._load(folder / STATE_FILE, state.global_step)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                          control: TrainerControl, **kwargs: Any) -> None:
        self.session.step()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or self.session.pruner is None:
            return
        extra = self.session.logs()
        logs.update(extra)
        # The Trainer appended a copy of these logs to its history just before.
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(extra)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if metrics and self.session.pruner is not None:
            self.session.observe(metrics)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if not args.should_save or self.session.pruner is None:
            return
        folder = _folder(args, state)
        if folder.is_dir():
            controller = self.session.controller
            checkpoint.save(folder / STATE_FILE, nn.Module(), self.session.pruner, rng=False,
                            states=None if controller is None else {"controller": controller},
                            meta={"global_step": state.global_step})
            if self.session.recipe is not None:
                self.session.recipe.to_yaml(folder / RECIPE_FILE)

    def _load(self, path: Path, step: int) -> None:
        if not path.is_file():
            raise FileNotFoundError(
                f"the Trainer resumes at step {step}, but {str(path)!r} holds no pruner "
                "state, so the pruning schedule would restart at step 0 (and pruned weights "
                "regrow): pass PruningCallback(resume_from=<the checkpoint folder>)")
        controller = self.session.controller
        checkpoint.load(path, nn.Module(), self.session.built(), rng=False,
                        states=None if controller is None else {"controller": controller})


def _folder(args: TrainingArguments, state: TrainerState) -> Path:
    """The checkpoint folder the Trainer writes at this step (``output_dir`` is set by then:
    ``TrainingArguments`` gives it a default)."""
    return Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
