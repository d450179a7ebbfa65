"""The training loop, the demo's runs, and ``secateurs demo`` end to end."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from secateurs.criteria import Clipping
from secateurs.demo import RUNS, DemoConfig, MaskWatch, RunContext
from secateurs.pruner import Pruner
from secateurs.train import (
    History,
    Split,
    Splits,
    StepCallback,
    evaluate,
    steps_per_epoch,
    train,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _blobs(n: int = 96, seed: int = 0) -> Splits:
    """Two well separated Gaussian blobs in 4 dimensions: a linear model learns them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 4, generator=g) + 3.0 * y[:, None].float()
    return Splits(Split(x, y), Split(x[:20], y[:20]), Split(x[20:40], y[20:40]))


def _fit(seed: int, callbacks: Sequence[StepCallback] = ()) -> tuple[nn.Linear, History]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = train(model, opt, _blobs(), epochs=3, batch_size=16, seed=seed,
                    callbacks=callbacks, progress=False)
    return model, history


# -- the training loop ---------------------------------------------------------------------


def test_train_is_deterministic_given_the_seed() -> None:
    (a, ha), (b, hb), (c, _) = _fit(1), _fit(1), _fit(2)
    assert torch.equal(a.weight, b.weight) and ha.steps["loss"] == hb.steps["loss"]
    assert not torch.equal(a.weight, c.weight)


def test_train_records_steps_epochs_and_callback_values() -> None:
    seen: list[int] = []

    def callback(step: int) -> dict[str, float] | None:
        seen.append(step)
        return {"late": 1.0} if step >= 10 else None

    _, history = _fit(0, [callback])
    total = 3 * steps_per_epoch(96, 16)
    assert seen == list(range(total)) == list(range(18))
    assert all(len(v) == total for v in history.steps.values())
    assert set(history.steps) == {"loss", "lr", "late"}
    assert all(math.isnan(v) for v in history.steps["late"][:10])
    assert history.steps["late"][10:] == [1.0] * 8
    assert history.epochs["epoch"] == [1.0, 2.0, 3.0]
    assert history.last("val_accuracy") == 1.0 and history.seconds > 0


def test_train_rejects_bad_epochs_and_batch_sizes() -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    for kwargs in ({"epochs": 0}, {"epochs": 1, "batch_size": 0}, {"epochs": 2.5}):
        with pytest.raises(ValueError, match=r"must be an integer >= 1, got"):
            train(model, opt, _blobs(), progress=False, **kwargs)
    assert torch.equal(model.weight, before)


def test_evaluate_counts_correct_predictions_and_restores_the_mode() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    split = Split(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 1.0]]),
                  torch.tensor([0, 1, 1, 0]))
    model.train()
    assert evaluate(model, split, batch_size=3) == 0.75
    assert model.training


def test_split_rejects_misaligned_tensors() -> None:
    with pytest.raises(ValueError, match="3 inputs and 2 labels"):
        Split(torch.zeros(3, 1), torch.zeros(2))


# -- the demo's pieces ---------------------------------------------------------------------


def test_mask_watch_counts_pruned_and_regrown_weights() -> None:
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, 0.2, 1.0, 2.0]]))
    watch = MaskWatch(Pruner(model, None, Clipping(threshold=0.5, margin=0.5)))
    assert watch(0) == {"sparsity": 0.5, "regrown": 0.0}
    with torch.no_grad():
        model.weight[0, 0] = 0.6   # above the pruning threshold, below regrowth at 0.75
        model.weight[0, 1] = 0.8   # above regrowth: comes back
    assert watch(1) == {"sparsity": 0.25, "regrown": 1.0}
    assert (watch.pruned, watch.regrown, watch.updates) == (2, 1, 2)


def test_runs_have_unique_names_and_build_on_any_run_length() -> None:
    assert [r.name for r in RUNS] == ["dense", "pruned", "clipping"]
    for total in (20, 100, 800):
        for spec in RUNS:
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            setup = spec.build(RunContext(model, opt, DemoConfig(), total))
            assert setup.callbacks and all(callable(c) for c in setup.callbacks)
            assert (setup.pruner is None) == (spec.name == "dense")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 0, "epochs must be an integer >= 1, got 0"),
    ("batch_size", 2.0, "batch_size must be an integer >= 1"),
    ("final_sparsity", 1.0, r"final_sparsity must be a finite number in \[0, 1\), got 1.0"),
    ("prune_span", (0.6, 0.1), "prune_span must be"),
    ("lr", float("nan"), r"lr must be a finite number in \(0, inf\), got nan"),
    ("max_norm", 0.0, r"max_norm must be a finite number in \(0, inf\)"),
])
def test_demo_config_names_the_bad_setting(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoConfig(**{field: value})  # type: ignore[arg-type]


def test_run_context_rounds_to_mask_update_steps() -> None:
    ctx = RunContext(nn.Linear(1, 1), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1),
                     DemoConfig(update_every=10), 799)
    assert (ctx.at(0.1), ctx.at(0.6), ctx.at(1.0)) == (70, 470, 790)


# -- end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_demo_writes_a_sensible_report(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from secateurs.cli import main

    epochs = 8
    assert main(["demo", "--quick", "--epochs", str(epochs), "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    match = re.search(r"Report written to (\S+)", out)
    assert match is not None
    folder = Path(match.group(1)).parent
    assert folder.parent == tmp_path
    assert all(name in out for name in ("dense", "pruned", "clipping", "test accuracy"))
    for name in ("schedules.png", "accuracy.png", "layer_sparsity.png"):
        assert (folder / name).read_bytes()[:8] == PNG
    md = (folder / "report.md").read_text()
    assert "secateurs demo --quick --epochs 8" in md and "![" in md
    runs = json.loads((folder / "metrics.json").read_text())["runs"]
    assert list(runs)[:3] == ["dense", "pruned", "clipping"]
    dense, pruned, clipping = (runs[n]["metrics"] for n in list(runs)[:3])
    oneshot = {n: runs[n]["metrics"] for n in runs if n.startswith("one-shot")}
    assert len(oneshot) == 3
    for m in oneshot.values():
        assert abs(m["sparsity"] - 0.85) < 1e-2
    # Reconstruction recovers accuracy that one-shot masking alone loses.
    assert oneshot["one-shot contribution + reconstruction"]["test_accuracy"] >= \
        oneshot["one-shot contribution"]["test_accuracy"]
    structured = runs["structured 50% channels (compacted)"]["metrics"]
    assert structured["parameters"] < dense["parameters"] / 2
    assert structured["macs"] < dense["macs"] / 2 and structured["speedup"] > 0
    assert abs(pruned["sparsity"] - 0.9) < 1e-3 and dense["sparsity"] < 1e-3
    assert dense["test_accuracy"] > 0.9 and pruned["test_accuracy"] > 0.85
    assert pruned["regrown"] == 0  # gradual pruning nests its masks
    assert 0 < clipping["sparsity"] < 1 and clipping["nonzero"] < dense["nonzero"]
    steps = epochs * steps_per_epoch(1257, DemoConfig.batch_size)
    trained = ["dense", "pruned", "clipping"]
    assert all(len(runs[n]["steps"]["lr"]) == steps for n in trained)
    assert all(len(runs[n]["epochs"]["test_accuracy"]) == epochs for n in trained)
