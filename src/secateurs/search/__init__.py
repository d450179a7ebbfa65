"""Choosing sparsities, thresholds and criteria by measurement: grid search and k-fold CV.

What a careful user does by hand, written down once:

- :func:`grid` lists configurations (the product of candidate values);
- :func:`kfold` splits the training pool into disjoint folds that cover it;
- :func:`run_trials` runs every configuration on every fold and stores each finished
  trial as one line of JSON (:class:`TrialStore`), so an interrupted search restarted on
  the same file skips the trials it finished and ends with the same result;
- :func:`summarize` averages the folds, :func:`pareto_front` keeps the configurations no
  other beats on both metric and sparsity (or MACs), and :func:`choose` applies a stated
  rule (:data:`CHOICE_RULE`): the sparsest configuration within budget of the baseline.

How one configuration is trained on a task is a *method* (:data:`METHODS`, in
:mod:`.methods`): ``gradual``, ``oneshot``, ``clipping``, ``budget`` and
``adaptive-clipping``, each fine-tuning from the same dense weights (a :class:`Setting`).
:func:`tune` runs the whole search on a task. A larger search can draw configurations
from a hyper-parameter library instead of :func:`grid`: :func:`run_trials` takes any
iterable of configurations.

Example:
    >>> configs = [{"method": "budget"}, *grid({"method": ["gradual"],
    ...                                           "sparsity": [0.5, 0.8, 0.9]})]
    >>> found = tune(get_task("digits"), configs, tolerance=0.01, folder="runs/search")
    >>> found.chosen.config, found.chosen.metrics["sparsity"]
"""

from __future__ import annotations

from .methods import (
    METHODS,
    Recipe,
    Setting,
    finetune,
    measure,
    register_method,
    run_method,
    sparse_macs,
)
from .trials import (
    CHOICE_RULE,
    Config,
    Result,
    Trial,
    TrialStore,
    choose,
    grid,
    kfold,
    pareto_front,
    run_trials,
    summarize,
    trial_key,
)
from .tune import TuneResult, train_dense, tune

__all__ = [
    "CHOICE_RULE",
    "METHODS",
    "Config",
    "Recipe",
    "Result",
    "Setting",
    "Trial",
    "TrialStore",
    "TuneResult",
    "choose",
    "finetune",
    "grid",
    "kfold",
    "measure",
    "pareto_front",
    "register_method",
    "run_method",
    "run_trials",
    "sparse_macs",
    "summarize",
    "train_dense",
    "trial_key",
    "tune",
]
