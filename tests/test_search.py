"""Grid search and k-fold cross-validation: folds, resumable trials, the Pareto front and
the choice; and the whole search on a tiny task, interrupted and resumed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateurs.search import (
    METHODS,
    Recipe,
    Result,
    TrialStore,
    choose,
    grid,
    kfold,
    pareto_front,
    run_trials,
    sparse_macs,
    summarize,
    tune,
)
from secateurs.tasks import ClassificationTask
from secateurs.train import Split, Splits


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Small models train many times faster on one intra-op thread of a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)



@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(2, 8), st.integers(0, 5))
def test_folds_are_disjoint_and_cover_the_data(n: int, k: int, seed: int) -> None:
    if k > n:
        with pytest.raises(ValueError, match="k must be an integer in"):
            kfold(n, k, seed=seed)
        return
    folds = kfold(n, k, seed=seed)
    vals = np.concatenate([val for _, val in folds])
    assert len(folds) == k and sorted(vals.tolist()) == list(range(n))
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == n


def test_stratified_folds_keep_the_class_proportions() -> None:
    labels = np.array([0] * 30 + [1] * 60)
    for _, val in kfold(90, 3, labels=labels):
        assert (labels[val] == 0).sum() == 10 and (labels[val] == 1).sum() == 20
    with pytest.raises(ValueError, match="rarest has 2"):
        kfold(5, 3, labels=np.array([0, 0, 1, 1, 1]))


def test_grid_is_the_ordered_product() -> None:
    assert grid({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    with pytest.raises(ValueError, match=r"empty: \['b'\]"):
        grid({"a": [1], "b": []})


def fake(config: dict, fold: int) -> dict[str, float]:
    """A deterministic trial: metric falls with sparsity, folds differ slightly."""
    s = config["sparsity"]
    return {"val": 0.95 - s**4 - 0.01 * fold, "sparsity": s, "macs": 1000 * (1 - s)}


class Interrupted(Exception):
    pass


def test_a_resumed_search_skips_finished_trials_and_equals_an_uninterrupted_one(
        tmp_path: Path) -> None:
    configs = grid({"method": ["gradual"], "sparsity": [0.5, 0.7, 0.8, 0.9]})
    whole = run_trials(configs, fake, folds=[0, 1], store=TrialStore(tmp_path / "a.jsonl"))
    calls = []

    def flaky(config: dict, fold: int) -> dict[str, float]:
        if len(calls) == 3:
            raise Interrupted
        calls.append((config["sparsity"], fold))
        return fake(config, fold)

    with pytest.raises(Interrupted):
        run_trials(configs, flaky, folds=[0, 1], store=TrialStore(tmp_path / "b.jsonl"))
    with (tmp_path / "b.jsonl").open("a") as handle:
        handle.write('{"config": {"method": "grad')  # a line cut short by the interruption
    resumed_calls = []

    def counting(config: dict, fold: int) -> dict[str, float]:
        resumed_calls.append((config["sparsity"], fold))
        return fake(config, fold)

    resumed = run_trials(configs, counting, folds=[0, 1], store=TrialStore(tmp_path / "b.jsonl"))
    assert len(resumed_calls) == 8 - 3 and not set(resumed_calls) & set(calls)
    assert [(t.config, t.fold, t.metrics) for t in resumed] == \
        [(t.config, t.fold, t.metrics) for t in whole]
    assert summarize(resumed) == summarize(whole)


def test_summarize_averages_folds() -> None:
    trials = run_trials([{"sparsity": 0.5}], fake, folds=[0, 1, 2])
    (result,) = summarize(trials)
    assert result.folds == 3 and result.metrics["val"] == pytest.approx(0.95 - 0.0625 - 0.01)
    assert result.metrics["val_std"] == pytest.approx(0.01)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 10)), min_size=1, max_size=12))
def test_the_pareto_front_is_exactly_the_undominated_points(points: list) -> None:
    results = [Result({"i": i}, {"x": float(x), "y": float(y)}, 1)
               for i, (x, y) in enumerate(points)]
    front = pareto_front(results, "x", "y")
    for r in results:
        x, y = r.metrics["x"], r.metrics["y"]
        dominated = any(o.metrics["x"] >= x and o.metrics["y"] >= y
                        and (o.metrics["x"] > x or o.metrics["y"] > y) for o in results)
        assert (r in front) == (not dominated)
    assert [r.metrics["x"] for r in front] == sorted(r.metrics["x"] for r in front)


def test_choose_takes_the_sparsest_within_budget() -> None:
    results = summarize(run_trials(grid({"sparsity": [0.5, 0.7, 0.8, 0.9]}), fake))
    chosen = choose(results, metric="val", limit=0.88)  # 0.95 - 0.7**4 = 0.71 fails
    assert chosen is not None and chosen.config == {"sparsity": 0.5}
    assert choose(results, metric="val", limit=0.5).config == {"sparsity": 0.8}
    assert choose(results, metric="val", limit=0.99) is None
    lower = choose(results, metric="val", limit=0.3, higher_is_better=False)
    assert lower is not None and lower.config == {"sparsity": 0.9}


def test_sparse_macs_count_positions_times_nonzero_weights() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 8, 3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 0, 0] = 1.0
    dense, nonzero = sparse_macs(model, torch.zeros(1, 1, 10))
    assert dense == 8 * 6 + 48 and nonzero == 8 * 1 + 48


# -- the whole search on a tiny task -------------------------------------------------------------


def blobs(seed: int = 0, **options: object) -> ClassificationTask:
    """Two Gaussian blobs in 8 dimensions and a small MLP: trains in milliseconds."""
    g = torch.Generator().manual_seed(123)
    y = torch.arange(240) % 2
    x = torch.randn(240, 8, generator=g) + 1.5 * (2 * y[:, None] - 1).float()
    data = Splits(Split(x[:160], y[:160]), Split(x[160:200], y[160:200]),
                  Split(x[200:], y[200:]))
    return ClassificationTask("blobs", data, lambda: nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)), num_classes=2, lr=0.05,
        batch_size=32, epochs=3, seed=seed)


CONFIGS = [{"method": "budget"}, {"method": "gradual", "sparsity": 0.5},
           {"method": "oneshot", "sparsity": 0.9}, {"method": "clipping", "threshold": 0.1},
           {"method": "adaptive-clipping", "threshold": 0.2}]


def test_tune_resumed_after_an_interruption_gives_the_same_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = Recipe(epochs=3, update_every=2)
    whole = tune(blobs(), CONFIGS, tolerance=0.05, folds=2, recipe=recipe,
                 folder=tmp_path / "whole")
    original = METHODS["clipping"]

    def broken(*args: object) -> object:
        raise Interrupted

    monkeypatch.setitem(METHODS, "clipping", broken)
    with pytest.raises(Interrupted):
        tune(blobs(), CONFIGS, tolerance=0.05, folds=2, recipe=recipe, folder=tmp_path / "cut")
    done = len((tmp_path / "cut" / "trials.jsonl").read_text().splitlines())
    assert done == 2 + 3 * 2  # two dense folds, three configurations on both folds
    monkeypatch.setitem(METHODS, "clipping", original)
    resumed = tune(blobs(), CONFIGS, tolerance=0.05, folds=2, recipe=recipe,
                   folder=tmp_path / "cut")

    def essence(found: object) -> list:
        return [(r.config, {k: v for k, v in r.metrics.items() if "seconds" not in k})
                for r in found.results]

    assert essence(resumed) == essence(whole)
    assert resumed.chosen is not None and resumed.chosen.config == whole.chosen.config
    assert resumed.final is not None and resumed.final.fold == 0
    assert (tmp_path / "cut" / resumed.final.extra["weights"]).is_file()
    assert resumed.sensitivity is not None
    assert resumed.limit == pytest.approx(whole.baseline.metrics["val"] - 0.05)


def test_tune_rejects_unknown_methods_and_bad_folds() -> None:
    with pytest.raises(ValueError, match=r"unknown methods \['prune-all'\]"):
        tune(blobs(), [{"method": "prune-all"}], tolerance=0.01)
    with pytest.raises(ValueError, match="folds must be an integer >= 1"):
        tune(blobs(), CONFIGS, tolerance=0.01, folds=0)


def test_trial_metrics_are_finite_and_sparsities_are_as_configured(tmp_path: Path) -> None:
    found = tune(blobs(), CONFIGS[1:3], tolerance=1.0, recipe=Recipe(epochs=2),
                 folder=tmp_path)
    by = {r.config["method"]: r.metrics for r in found.results}
    assert by["gradual"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by["oneshot"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert by["oneshot"]["macs"] < by["gradual"]["macs"] < found.baseline.metrics["macs"]
    assert all(math.isfinite(v) for r in found.results for v in r.metrics.values())
    stored = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert {s["config"]["method"] for s in stored} == {"dense", "gradual", "oneshot"}
