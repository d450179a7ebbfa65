"""Sensitivity analysis: measurement, and per-target sparsities derived from it."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateurs import Pruner
from secateurs.controllers import Sensitivity, measure_sensitivity
from secateurs.validation import ArgumentTypeError


def probe(model: nn.Module) -> float:
    """A metric that only the first layer's weights move: its sum of |w| relative."""
    w = model[0].weight.detach()
    return float(w.abs().sum() / (w.numel() * 0.25))


def test_measure_prunes_each_target_alone_and_restores_the_weights(mlp: nn.Module) -> None:
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    sens = measure_sensitivity(mlp, probe, (0.5, 0.9))
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert list(sens.metrics) == ["0.weight", "2.weight", "4.weight"]
    assert sens.sizes == {"0.weight": 512, "2.weight": 1024, "4.weight": 128}
    assert sens.metrics["2.weight"] == [sens.baseline] * 2  # pruning it moves nothing
    first = sens.metrics["0.weight"]
    assert first[0] < sens.baseline and first[1] < first[0]
    assert sens.drops("0.weight")[1] == pytest.approx(sens.baseline - first[1])


def test_measure_reads_a_mapping_and_rejects_bad_sparsities(mlp: nn.Module) -> None:
    sens = measure_sensitivity(mlp, lambda m: {"loss": probe(m)}, (0.5,), metric="loss",
                               higher_is_better=False)
    assert sens.drops("0.weight")[0] < 0  # lower is better: a lower value is no damage
    for bad in [(), (0.5, 0.5), (0.0, 0.5), (0.5, 1.0)]:
        with pytest.raises(ValueError, match="strictly increasing values in"):
            measure_sensitivity(mlp, probe, bad)
    with pytest.raises(ArgumentTypeError, match=r"sparsities\[1\] must be .*str '0.9'"):
        measure_sensitivity(mlp, probe, (0.5, "0.9"))  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="higher_is_better must be True or False"):
        measure_sensitivity(mlp, probe, (0.5,), higher_is_better=1)  # type: ignore[arg-type]


def curves() -> Sensitivity:
    """Three targets: a small sensitive one, and two large robust ones."""
    return Sensitivity(
        baseline=0.9, sparsities=(0.5, 0.8, 0.9, 0.95),
        metrics={"a": [0.85, 0.5, 0.3, 0.1], "b": [0.9, 0.89, 0.87, 0.8],
                 "c": [0.9, 0.9, 0.88, 0.85]},
        sizes={"a": 100, "b": 1000, "c": 2000})


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 0.94))
def test_allocation_meets_the_overall_target_and_protects_the_sensitive_target(
        overall: float) -> None:
    sens = curves()
    shares = sens.allocate(overall)
    total = sum(sens.sizes.values())
    assert sum(sens.sizes[n] * s for n, s in shares.items()) / total == \
        pytest.approx(overall, abs=1e-9)
    assert all(0.0 <= s <= 0.95 for s in shares.values())
    if overall > 0.3:
        assert shares["a"] < shares["b"] and shares["a"] < shares["c"]


@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 0.94), st.floats(0.0, 0.94))
def test_allocation_never_decreases_as_the_overall_target_grows(x: float, y: float) -> None:
    low, high = sorted((x, y))
    a, b = curves().allocate(low), curves().allocate(high)
    assert all(a[n] <= b[n] + 1e-9 for n in a)


def test_allocation_limits_and_round_trip() -> None:
    sens = curves()
    assert sens.allocate(0.0) == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert sens.max_overall() == pytest.approx(0.95)
    with pytest.raises(ValueError, match="above 0.95"):
        sens.allocate(0.96)
    with pytest.raises(ValueError, match=r"overall must be .*in \[0, 1\).*1\.0"):
        sens.allocate(1.0)
    with pytest.raises(ArgumentTypeError, match="overall must be .*str '0.5'"):
        sens.allocate("0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_sparsity must be .*in \[0, 1\).*1\.5"):
        sens.allocate(0.5, max_sparsity=1.5)
    capped = sens.allocate(0.5, max_sparsity=0.8)
    assert max(capped.values()) <= 0.8
    copy = Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict())))
    assert copy == sens
    header, rows = sens.table(allocation=capped)
    assert header[-1] == "allocated" and rows[0][0] == "a" and len(rows) == 3
    assert curves().curves()["a"] == ([0.0, 0.5, 0.8, 0.9, 0.95], [0.9, 0.85, 0.5, 0.3, 0.1])


def test_the_pruner_realises_a_measured_allocation(mlp: nn.Module) -> None:
    sens = measure_sensitivity(mlp, probe, (0.5, 0.8, 0.95))
    shares = sens.allocate(0.8)
    pruner = Pruner(mlp, shares)
    pruner.step()
    assert pruner.sparsity() == pytest.approx(0.8, abs=3 / 1664)
    assert pruner.sparsity("0.weight") < pruner.sparsity("2.weight")


def test_the_old_module_path_warns_and_forwards() -> None:
    import secateurs.controllers.sensitivity as new
    import secateurs.sensitivity as old

    with pytest.warns(DeprecationWarning, match="secateurs.controllers.sensitivity.Sensitivity"):
        assert old.Sensitivity is new.Sensitivity
    with pytest.warns(DeprecationWarning, match="measure_sensitivity"):
        assert old.measure_sensitivity is measure_sensitivity
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        old.nope  # noqa: B018
