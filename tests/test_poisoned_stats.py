"""Poisoned statistics are refused, not absorbed: an observation holding NaN or Inf is
skipped and counted (one warning), finite inputs whose squares overflow float32 still give
exact statistics, and non-finite statistics are refused when scoring and when loading."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.calibration import InputStats
from secateurs.criteria import Contribution, Taylor
from secateurs.validation import ArgumentTypeError


def _pruner(criterion: sc.Criterion) -> tuple[nn.Module, sc.Pruner, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, sc.Pruner(model, 0.5, criterion, update_every=4, optimizer=opt), opt


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
    opt.step()


def test_an_inf_in_one_sample_is_skipped_counted_and_warned_once() -> None:
    model, pruner, _ = _pruner(Contribution())
    g = torch.Generator().manual_seed(1)
    clean = [torch.randn(8, 16, generator=g) for _ in range(4)]
    poisoned = [x.clone() for x in clean]
    poisoned[1][3, 5] = float("inf")  # one fp16 overflow in one sample
    poisoned[2][0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for x in poisoned:
                model(x)  # training mode: the hooks observe
    skipped = [w for w in caught if "skipped a training batch" in str(w.message)]
    assert len(skipped) == 1 and skipped[0].category is RuntimeWarning
    # The poison reaches the second layer too.
    assert pruner.criterion.skipped == {"0.weight": 2, "2.weight": 2}  # type: ignore[attr-defined]
    # The statistics are those of the clean batches alone, never NaN or Inf.
    reference, ref_pruner, _ = _pruner(Contribution())
    with torch.no_grad():
        for x in (clean[0], clean[3]):
            reference(x)
    got = pruner.criterion.state_dict()["values"]
    want = ref_pruner.criterion.state_dict()["values"]
    for name in got:
        assert bool(torch.isfinite(got[name]).all())
    assert torch.equal(got["0.weight"], want["0.weight"])
    pruner.step()  # masks from finite statistics
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.02)


def test_inputs_whose_squares_overflow_float32_give_exact_statistics() -> None:
    model, pruner, _ = _pruner(Contribution())
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2)) * 3e19
    with torch.no_grad():
        model[0](x)  # the first layer's input: finite, its squares beyond float32
    value = pruner.criterion.state_dict()["values"]["0.weight"]
    exact = x.double().square().mean(0)
    assert value.dtype == torch.float64 and bool(torch.isfinite(value).all())
    torch.testing.assert_close(value, exact, rtol=1e-6, atol=0)
    assert pruner.criterion.skipped == {}  # type: ignore[attr-defined]


def test_taylor_skips_non_finite_gradients_and_multiplies_in_float32() -> None:
    model, pruner, opt = _pruner(Taylor())
    _step(model, opt, torch.randn(8, 16))
    before = {k: v.clone() for k, v in pruner.criterion.state_dict()["values"].items()}
    x = torch.randn(8, 16)
    x[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="skipped a training batch"):
        _step(model, opt, x)
    after = pruner.criterion.state_dict()["values"]
    assert all(bool(torch.isfinite(v).all()) for v in after.values())
    assert torch.equal(after["0.weight"], before["0.weight"])
    assert pruner.criterion.skipped["0.weight"] == 1  # type: ignore[attr-defined]


def test_non_finite_statistics_are_refused_at_the_update() -> None:
    model, pruner, _ = _pruner(Contribution())
    stats = {n: InputStats.empty(f) for n, f in (("0.weight", 16), ("2.weight", 32))}
    for s in stats.values():
        s.count = 4
        s.power_sums[2.0].fill_(1.0)
    stats["0.weight"].power_sums[2.0][3] = float("inf")  # from an overflowing calibration
    pruner.criterion.calibrate(model, pruner.targets, [], stats=stats,  # type: ignore[attr-defined]
                               progress=False)
    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="NaN or Inf statistics for target '0.weight'"):
        pruner.update()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert all(bool(m.all()) for m in pruner.masks.values())


def test_non_finite_or_misshapen_statistics_are_refused_at_load() -> None:
    model, pruner, opt = _pruner(Contribution())
    _step(model, opt, torch.randn(8, 16))
    state = pruner.criterion.state_dict()
    before = {k: v.clone() for k, v in state["values"].items()}
    bad = {**state, "values": {**state["values"], "0.weight": torch.full((16,), float("nan"),
                                                                         dtype=torch.float64)}}
    with pytest.raises(ValueError, match="'0.weight' hold NaN or Inf"):
        pruner.criterion.load_state_dict(bad)
    bad = {**state, "values": {**state["values"], "0.weight": torch.ones(4, 4)}}
    with pytest.raises(ValueError, match=r"have shape \(4, 4\); this target's have \(16,\)"):
        pruner.criterion.load_state_dict(bad)
    bad = {**state, "calls": {"0.weight": -1}}
    with pytest.raises(ValueError, match="counts >= 0"):
        pruner.criterion.load_state_dict(bad)
    after = pruner.criterion.state_dict()["values"]
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_the_gram_matrix_of_huge_finite_inputs_does_not_overflow() -> None:
    stats = InputStats.empty(4, hessian=True)
    x = torch.full((3, 4), 3e19)
    stats.add({1.0: x.double().abs().sum(0), 2.0: x.double().square().sum(0)}, 3, x)
    assert stats.is_finite()
    torch.testing.assert_close(stats.hessian(), torch.full((4, 4), 9e38, dtype=torch.float64))


def test_sync_is_a_boolean() -> None:
    with pytest.raises(ArgumentTypeError, match="sync must be"):
        Contribution(sync="yes")  # type: ignore[arg-type]
