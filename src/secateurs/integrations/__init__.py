"""Pruning inside the training frameworks people use: each module imports its framework,
and is imported only by those who use it (``import secateurs`` loads none of them).

- :mod:`.hf`: :class:`~secateurs.integrations.hf.PruningCallback`, a Hugging Face
  ``TrainerCallback`` (``pip install 'secateurs[hf]'``).
- :mod:`.lightning`: :class:`~secateurs.integrations.lightning.PruningCallback`, a
  Lightning ``Callback`` (``pip install 'secateurs[lightning]'``).
- :mod:`.accelerate`: :func:`~secateurs.integrations.accelerate.prepare_pruner`, a
  :class:`~secateurs.Pruner` for a model and optimizer that ``accelerator.prepare`` returned,
  saved and restored by ``accelerator.save_state`` / ``load_state``
  (``pip install 'secateurs[accelerate]'``).

Each callback builds the pruner when training starts (from the model and the optimizer the
framework made), calls :meth:`~secateurs.Pruner.step` once per optimizer step (not per
micro-batch under gradient accumulation), logs the sparsity through the framework's logger,
feeds evaluation metrics to a controller (:class:`~secateurs.controllers.Budget`,
:class:`~secateurs.controllers.Plateau`) and saves the pruner's state with the framework's
checkpoints, so a resumed run continues the schedule where it stopped.
"""
