"""The whole search on a task: dense baseline, every configuration, the choice."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import validation as check
from ..controllers import read_metric
from ..controllers.sensitivity import Sensitivity, measure_sensitivity
from ..lr import ScheduledLR
from ..schedules import Cosine
from ..tasks import Resplittable, Task
from .methods import METHODS, Recipe, Setting, run_method
from .trials import (
    CHOICE_RULE,
    Config,
    Result,
    Trial,
    TrialStore,
    choose,
    kfold,
    run_trials,
    summarize,
    trial_key,
)

__all__ = ["CHOICE_RULE", "TuneResult", "train_dense", "tune"]


def train_dense(task: Task, seed: int = 0, *, progress: bool = False) -> nn.Module:
    """Train ``task.model(seed)`` for ``task.epochs`` with a cosine-decayed learning rate."""
    model = task.model(seed)
    optimizer = task.optimizer(model)
    lr = ScheduledLR(optimizer, Cosine(1.0, 0.0, end_step=max(1, task.epochs
                                                                * task.steps_per_epoch)))
    for epoch in tqdm(range(task.epochs), desc="dense", leave=False, disable=not progress,
                      dynamic_ncols=True):
        task.train_epoch(model, optimizer, epoch=epoch, callbacks=[lambda _: lr.step()])
    return model


@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        baseline: The dense model's metrics (mean over folds).
        limit: The worst validation metric within budget.
        results: Every configuration's metrics, mean over folds (the dense one excluded).
        trials: Every trial, the dense ones first.
        chosen: The configuration :func:`choose` picked, or ``None`` if none is in budget.
        final: The chosen configuration trained on the task's own split (``extra`` names
            its saved weights), or ``None``.
        sensitivity: The dense model's sensitivity on the task's own split, if measured.
    """

    baseline: Result
    limit: float
    results: list[Result]
    trials: list[Trial]
    chosen: Result | None
    final: Trial | None
    sensitivity: Sensitivity | None


class _Folds:
    """Lazily built :class:`Setting` of each fold (0: the task's own split), cached on disk."""

    def __init__(self, task: Task, folds: int, tolerance: float, relative: bool,
                 recipe: Recipe, folder: Path | None, progress: bool) -> None:
        self.task, self.recipe, self.folder, self.progress = task, recipe, folder, progress
        self.budget = (tolerance, relative)
        self.splits: list[tuple[np.ndarray, np.ndarray]] = []
        if folds > 1:
            if not isinstance(task, Resplittable):
                raise ValueError(f"{folds}-fold cross-validation needs a task with "
                                 f"pool_labels() and resplit(); {task.name!r} has neither")
            labels = task.pool_labels().numpy()
            self.splits = kfold(len(labels), folds, seed=recipe.seed, labels=labels)
        self.ids = [0] if folds == 1 else list(range(1, folds + 1))
        self._settings: dict[int, Setting] = {}

    def _path(self, name: str) -> Path | None:
        return None if self.folder is None else self.folder / name

    def __getitem__(self, fold: int) -> Setting:
        if fold not in self._settings:
            self._settings[fold] = self._build(fold)
        return self._settings[fold]

    def _build(self, fold: int) -> Setting:
        task = self.task if fold == 0 else self.task.resplit(*self.splits[fold - 1])  # type: ignore[attr-defined]
        path, start = self._path(f"dense-fold{fold}.pt"), time.perf_counter()
        model = task.model(self.recipe.seed)
        if path is not None and path.is_file():
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            model = train_dense(task, self.recipe.seed, progress=self.progress)
            if path is not None:
                torch.save(model.state_dict(), path)
        seconds = time.perf_counter() - start
        baseline = read_metric(task.evaluate(model, "val"), task.metric)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        setting = Setting(task, state, baseline, *self.budget, self.recipe,
                          lambda: self._sensitivity(fold), seconds)
        return setting

    def _sensitivity(self, fold: int) -> Sensitivity:
        cached = getattr(self, f"_sens{fold}", None)
        if cached is not None:
            return cached
        path = self._path(f"sensitivity-fold{fold}.json")
        if path is not None and path.is_file():
            sens = Sensitivity.from_dict(json.loads(path.read_text()))
        else:
            setting = self[fold]
            task = setting.task
            sens = measure_sensitivity(setting.model(), lambda m: task.evaluate(m, "val"),
                                       metric=task.metric,
                                       higher_is_better=task.higher_is_better,
                                       progress=self.progress)
            if path is not None:
                path.write_text(json.dumps(sens.to_dict()))
        setattr(self, f"_sens{fold}", sens)
        return sens

    def run(self, config: Config, fold: int) -> tuple[dict[str, float], dict[str, Any]]:
        model, metrics, extra = run_method(self[fold], config)
        path = self._path("models")
        if fold == 0 and path is not None:
            path.mkdir(exist_ok=True)
            name = hashlib.sha1(trial_key(config, fold).encode()).hexdigest()[:12] + ".pt"
            torch.save(model.state_dict(), path / name)
            extra["weights"] = f"models/{name}"
        return metrics, extra


def tune(task: Task, configs: Sequence[Config], *, tolerance: float, relative: bool = False,
         folds: int = 1, recipe: Recipe | None = None, folder: str | os.PathLike[str] | None = None,
         progress: bool = False) -> TuneResult:
    """Train the dense model, try every configuration, choose by :data:`CHOICE_RULE`.

    With ``folds > 1``, the training and validation examples are pooled and split into
    ``folds`` stratified folds; each fold trains its own dense model and every
    configuration, and metrics are averaged over the folds; the chosen configuration is
    then trained once more on the task's own split (``final``). Trials, dense weights,
    sensitivities and the weights of every trial on the task's own split are kept in
    ``folder``; calling again with the same folder resumes where it stopped.

    Args:
        task: The task.
        configs: Configurations, each with a ``method`` of :data:`METHODS`.
        tolerance: The budget: how far the validation metric may fall from the dense one.
        relative: Read ``tolerance`` as a fraction of the baseline.
        folds: 1 for the task's own split, ``k >= 2`` for k-fold cross-validation.
        recipe: Fine-tuning settings (default :class:`Recipe`).
        folder: Where the search is stored (``trials.jsonl``...), ``None`` for memory only.
        progress: Show progress bars.

    Raises:
        ArgumentTypeError: for an argument of the wrong type.
        ValueError: on an unknown method, a bad ``folds`` or ``tolerance``, or a task that
            cannot be re-split.
    """
    unknown = sorted({str(c.get("method")) for c in configs} - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(sorted(METHODS))}")
    folds = check.integer("folds", folds, low=1)
    tolerance = check.number("tolerance", tolerance, low=0.0)
    check.boolean("relative", relative)
    check.optional(check.instance, "recipe", recipe, types=Recipe, what="a Recipe")
    recipe = Recipe() if recipe is None else recipe
    base = None if folder is None else Path(folder)
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    store = TrialStore(None if base is None else base / "trials.jsonl")
    state = _Folds(task, folds, tolerance, relative, recipe, base, progress)
    dense = run_trials([{"method": "dense"}], state.run, folds=state.ids, store=store)
    trials = run_trials(configs, state.run, folds=state.ids, store=store, progress=progress)
    baseline = summarize(dense)[0]
    amount = tolerance * abs(baseline.metrics["val"]) if relative else tolerance
    limit = baseline.metrics["val"] + (-amount if task.higher_is_better else amount)
    results = summarize(trials)
    chosen = choose(results, metric="val", limit=limit, higher_is_better=task.higher_is_better)
    final = None
    if chosen is not None:
        final = run_trials([chosen.config], state.run, folds=[0], store=store)[0]
    uses = any(c.get("method") == "budget" and c.get("allocation", "sensitivity")
               == "sensitivity" for c in configs)
    return TuneResult(baseline, limit, results, dense + trials, chosen, final,
                      state._sensitivity(0) if uses else None)
