"""Pruning with Hugging Face Accelerate (``pip install 'secateurs[accelerate]'``).

Build the pruner after ``accelerator.prepare(...)``, on the module inside what it returned
(:func:`prepare_pruner` unwraps it once: DistributedDataParallel's ``.module``,
``torch.compile``'s original module, so target names are the model's own), with the
prepared optimizer (the pruner masks the state of the optimizer inside Accelerate's
wrapper). Masks follow their parameters' device: a pruner built before ``prepare`` moved
the model to an accelerator moves its masks there at its next step. Under gradient
accumulation, step the pruner only when the optimizer stepped
(``accelerator.sync_gradients``).

Example:
    >>> model, opt, loader = accelerator.prepare(model, opt, loader)
    >>> pruner = prepare_pruner(accelerator, model, opt, sparsity=schedule, update_every=50)
    >>> for x, y in loader:
    ...     with accelerator.accumulate(model):
    ...         accelerator.backward(loss_fn(model(x), y))
    ...         opt.step()
    ...         opt.zero_grad()
    ...     if accelerator.sync_gradients:
    ...         pruner.step()
    >>> accelerator.save_state("run")   # the pruner's state with the rest; load_state too
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..criteria import Criterion
from ..pruner import Pruner, SparsitySpec
from ._session import Session

__all__ = ["prepare_pruner"]


def prepare_pruner(accelerator: Accelerator, model: nn.Module,
                   optimizer: torch.optim.Optimizer | None = None, sparsity: SparsitySpec = None,
                   criterion: str | Criterion | None = None, *, recipe: Any = None,
                   **options: Any) -> Pruner:
    """A :class:`~secateurs.Pruner` for a model and optimizer ``accelerator.prepare``
    returned, registered with ``accelerator.register_for_checkpointing`` so that
    ``accelerator.save_state`` / ``load_state`` save and restore it with the rest.

    Args:
        accelerator: The ``Accelerator`` that prepared ``model``.
        model: The prepared model (wrapped or not).
        optimizer: The prepared optimizer, whose state the pruner masks.
        sparsity: The pruner's ``sparsity``.
        criterion: The pruner's ``criterion`` (default ``magnitude``).
        recipe: Instead of ``sparsity``, ``criterion`` and the options it sets: a
            :class:`~secateurs.recipes.TrainingRecipe`, a mapping of its fields or the path
            of its YAML file.
        **options: Further arguments of :class:`~secateurs.Pruner`.

    Returns:
        The pruner, on the unwrapped module.
    """
    session = Session(sparsity, criterion, None, options, recipe)  # checks the arguments
    module = accelerator.unwrap_model(model, keep_torch_compile=False)
    pruner = session.build(module, optimizer)
    accelerator.register_for_checkpointing(pruner)
    return pruner
