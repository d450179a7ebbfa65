"""Grid search and k-fold cross-validation over configurations, with resumable trials.

Trials are stored one JSON line each as they finish (:class:`TrialStore`), so an
interrupted search restarted on the same file skips the trials it finished and ends with
the same result.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import validation as check

__all__ = ["CHOICE_RULE", "Config", "Result", "Trial", "TrialStore", "choose", "grid", "kfold",
           "pareto_front", "run_trials", "summarize", "trial_key"]

#: The rule :func:`choose` applies, in words.
CHOICE_RULE = ("the sparsest configuration whose mean validation metric is within the budget "
               "of the baseline (ties: the better metric)")

Config = dict[str, Any]


def grid(space: Mapping[str, Sequence[Any]]) -> list[Config]:
    """Every combination of the candidate values, in order (the last key varies fastest).

    Args:
        space: Option name -> candidate values, e.g. ``{"sparsity": [0.8, 0.9]}``.

    Raises:
        ArgumentTypeError: if ``space`` is not a mapping.
        ValueError: if a key has no candidates.
    """
    check.instance("space", space, Mapping, "a mapping of option name -> candidate values")
    empty = [key for key, values in space.items() if not len(values)]
    if empty:
        raise ValueError(f"every option needs at least one candidate; empty: {empty}")
    keys = list(space)
    return [dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(space[k] for k in keys))]


def kfold(n: int, k: int, *, seed: int = 0,
          labels: Sequence[int] | np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` folds of ``range(n)``: ``(train, val)`` index pairs, shuffled with ``seed``.

    The validation parts are disjoint and together cover every index once; each train part
    is the rest. With ``labels``, folds keep the class proportions (stratified).

    Raises:
        ArgumentTypeError: if ``n`` or ``k`` is not an integer.
        ValueError: if ``k < 2`` or ``k > n`` (or a class has fewer than ``k`` examples).
    """
    # scikit-learn takes about a second to import: only a search that splits pays for it.
    from sklearn.model_selection import KFold, StratifiedKFold

    n = check.integer("n", n, low=0)
    k = check.integer("k", k, low=2, high=n)
    index = np.arange(n)
    if labels is None:
        splits = KFold(k, shuffle=True, random_state=seed).split(index)
    else:
        labels = np.asarray(labels)
        counts = np.unique(labels, return_counts=True)[1]
        if counts.min() < k:
            raise ValueError(f"stratified {k}-fold needs >= {k} examples of every class, the "
                             f"rarest has {int(counts.min())}")
        splits = StratifiedKFold(k, shuffle=True, random_state=seed).split(index, labels)
    return [(np.sort(train), np.sort(val)) for train, val in splits]


def trial_key(config: Mapping[str, Any], fold: int) -> str:
    """The identity of a trial: its configuration and fold, as canonical JSON."""
    return json.dumps({"config": config, "fold": fold}, sort_keys=True)


@dataclass
class Trial:
    """One configuration trained and measured on one fold."""

    config: Config
    fold: int
    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """See :func:`trial_key`."""
        return trial_key(self.config, self.fold)


class TrialStore:
    """Finished trials, one JSON line each, appended as they finish.

    Lines that cannot be read (a line cut short by an interruption) are ignored, so a
    store can always be reopened and its trials resumed.

    Args:
        path: The ``.jsonl`` file, created on the first :meth:`add`; ``None`` keeps the
            trials in memory only.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        self._trials: dict[str, Trial] = {}
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    data = json.loads(line)
                    trial = Trial(data["config"], int(data["fold"]), data["metrics"],
                                  data.get("extra", {}))
                except (ValueError, KeyError, TypeError):
                    continue
                self._trials[trial.key] = trial

    def __contains__(self, key: str) -> bool:
        return key in self._trials

    def __len__(self) -> int:
        return len(self._trials)

    def get(self, key: str) -> Trial | None:
        """The finished trial with this key, if any."""
        return self._trials.get(key)

    def add(self, trial: Trial) -> None:
        """Record a finished trial, durably (flushed and synced before returning)."""
        if self.path is not None:
            line = json.dumps({"config": trial.config, "fold": trial.fold,
                               "metrics": trial.metrics, "extra": trial.extra},
                              sort_keys=True, allow_nan=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        self._trials[trial.key] = trial


#: ``(config, fold) -> metrics`` or ``(metrics, extra)``.
RunOne = Callable[[Config, int], "Mapping[str, float] | tuple[Mapping[str, float], dict]"]


def run_trials(configs: Iterable[Config], run_one: RunOne, *, folds: Sequence[int] = (0,),
               store: TrialStore | None = None, progress: bool = False,
               desc: str = "trials") -> list[Trial]:
    """Run every configuration on every fold, skipping trials the store already holds.

    Args:
        configs: Configurations (JSON-serialisable mappings).
        run_one: Trains and measures one configuration on one fold; returns its metrics,
            or ``(metrics, extra)`` with extra JSON-serialisable data (e.g. a history).
        folds: Fold numbers.
        store: Where finished trials are kept; ``None`` keeps them in memory only.
        progress: Show a progress bar.
        desc: Label of the progress bar.

    Returns:
        Every trial, in configuration then fold order.
    """
    todo = [(dict(c), f) for c in configs for f in folds]
    trials = []
    bar = tqdm(todo, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for config, fold in bar:
        key = trial_key(config, fold)
        found = store.get(key) if store is not None else None
        if found is None:
            bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in config.items()), refresh=True)
            out = run_one(config, fold)
            metrics, extra = out if isinstance(out, tuple) else (out, {})
            found = Trial(config, fold, {k: float(v) for k, v in metrics.items()}, extra)
            if store is not None:
                store.add(found)
        trials.append(found)
    bar.close()
    return trials


@dataclass
class Result:
    """A configuration's metrics averaged over its folds (``<key>_std``: their spread)."""

    config: Config
    metrics: dict[str, float]
    folds: int


def summarize(trials: Iterable[Trial]) -> list[Result]:
    """Average each configuration's metrics over its folds, in first-seen order."""
    groups: dict[str, list[Trial]] = {}
    for trial in trials:
        groups.setdefault(json.dumps(trial.config, sort_keys=True), []).append(trial)
    results = []
    for members in groups.values():
        keys = list(members[0].metrics)
        metrics = {}
        for key in keys:
            values = np.array([t.metrics.get(key, math.nan) for t in members], dtype=float)
            metrics[key] = float(values.mean())
            if len(members) > 1:
                metrics[f"{key}_std"] = float(values.std(ddof=1))
        results.append(Result(members[0].config, metrics, len(members)))
    return results


def pareto_front(results: Sequence[Result], x: str, y: str, *,
                 maximize: tuple[bool, bool] = (True, True)) -> list[Result]:
    """The results no other result beats on both ``x`` and ``y``, sorted by ``x``.

    A result is dominated when another is at least as good on both and better on one.
    """
    sx, sy = (1.0 if m else -1.0 for m in maximize)
    points = [(sx * r.metrics[x], sy * r.metrics[y], r) for r in results
              if math.isfinite(r.metrics.get(x, math.nan))
              and math.isfinite(r.metrics.get(y, math.nan))]
    front = [r for a, b, r in points
             if not any(c >= a and d >= b and (c > a or d > b) for c, d, _ in points)]
    return sorted(front, key=lambda r: r.metrics[x])


def choose(results: Sequence[Result], *, metric: str, limit: float,
           higher_is_better: bool = True, by: str = "sparsity") -> Result | None:
    """Apply :data:`CHOICE_RULE`: the highest ``by`` among results within ``limit``.

    Args:
        results: Averaged results.
        metric: The metric judged against the budget (e.g. ``"val"``).
        limit: The worst value of ``metric`` within budget.
        higher_is_better: Direction of the metric.
        by: What is maximised among the results within budget.

    Returns:
        The chosen result, or ``None`` when no result is within budget.
    """
    sign = 1.0 if higher_is_better else -1.0
    within = [r for r in results if sign * (r.metrics[metric] - limit) >= -1e-12]
    if not within:
        return None
    return max(within, key=lambda r: (round(r.metrics[by], 9), sign * r.metrics[metric]))
