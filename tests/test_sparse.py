"""Sparse execution: CSR layers compute what dense ones do, and are swapped in only where
measured faster."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from secateurs.export import SparseLinear, sparsify_
from secateurs.export import sparse as sparse_module


def _sparse_linear(out_f: int, in_f: int, sparsity: float, bias: bool = True,
                   seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < sparsity] = 0
    return layer


@given(out_f=st.integers(1, 24), in_f=st.integers(1, 24), sparsity=st.floats(0, 1),
       bias=st.booleans(), lead=st.lists(st.integers(1, 3), max_size=2),
       seed=st.integers(0, 1000))
def test_csr_layer_computes_the_dense_layer(out_f: int, in_f: int, sparsity: float,
                                            bias: bool, lead: list[int], seed: int) -> None:
    dense = _sparse_linear(out_f, in_f, sparsity, bias, seed)
    csr = SparseLinear.from_linear(dense)
    x = torch.randn(*lead, in_f)
    with torch.no_grad():
        torch.testing.assert_close(csr(x), dense(x), rtol=1e-5, atol=1e-5)
    assert csr.nnz == int(torch.count_nonzero(dense.weight))
    assert torch.equal(csr.to_linear().weight, dense.weight)


def test_state_dict_round_trip_and_invalid_indices_refused() -> None:
    layer = SparseLinear.from_linear(_sparse_linear(6, 8, 0.7))
    other = SparseLinear.from_linear(_sparse_linear(6, 8, 0.7, seed=1))
    state = layer.state_dict()
    assert set(state) == {"crow_indices", "col_indices", "values", "bias"}
    other.load_state_dict(state)
    x = torch.randn(3, 8)
    assert torch.equal(other(x), layer(x))
    state["col_indices"] = state["col_indices"] + 100
    with pytest.raises(ValueError, match="CSR buffers in the state_dict are invalid"):
        SparseLinear.from_linear(_sparse_linear(6, 8, 0.7)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"input of shape \(3, 5\) has 5 features.*takes 8"):
        layer(torch.randn(3, 5))


def _model() -> nn.Module:
    model = nn.Sequential(_sparse_linear(64, 32, 0.95), nn.ReLU(), _sparse_linear(64, 64, 0.2),
                          nn.ReLU(), _sparse_linear(8, 64, 0.9))
    return model.eval()


@pytest.mark.parametrize(("dense_ms", "csr_ms", "swapped"),
                         [(1.0, 0.5, True), (1.0, 0.95, False), (1.0, 2.0, False)])
def test_swap_follows_the_measurement(monkeypatch: pytest.MonkeyPatch, dense_ms: float,
                                      csr_ms: float, swapped: bool) -> None:
    monkeypatch.setattr(sparse_module, "time_ms",
                        lambda fns, repeats: {"dense": dense_ms, "csr": csr_ms})
    model = _model()
    report = sparsify_(model, margin=0.1)
    assert [r.name for r in report] == ["0", "2", "4"]
    assert report[1].reason == "below min_sparsity" and math.isnan(report[1].dense_ms)
    for row, index in ((report[0], 0), (report[2], 4)):
        assert row.swapped is swapped
        assert isinstance(model[index], SparseLinear) is swapped
        assert row.speedup == pytest.approx(dense_ms / csr_ms)
    assert isinstance(model[2], nn.Linear)
    assert "decision" in str(report) and "below min_sparsity" in str(report)


def test_real_measurement_keeps_outputs_and_global_rng() -> None:
    model = _model()
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = model(x)
    rng = torch.get_rng_state()
    report = sparsify_(model, batch_size=16, repeats=3)
    assert torch.equal(torch.get_rng_state(), rng)
    measured = [r for r in report if r.reason in ("faster", "slower")]
    assert len(measured) == 2
    assert all(r.dense_ms > 0 and r.sparse_ms > 0 for r in measured)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("options", "match"), [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"min_sparsity": 1.0}, r"min_sparsity must be a number in \[0, 1\), got 1.0"),
    ({"margin": -0.1}, "margin must be a number"),
    ({"repeats": 2.5}, "repeats must be an integer"),
    ({"targets": ["1"]}, "neither a parameter"),
    ({"targets": []}, "matched no parameter"),
])
def test_bad_options_refused_before_any_swap(options: dict, match: str) -> None:
    model = _model()
    with pytest.raises(ValueError, match=match):
        sparsify_(model, **options)
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2, 4))


def test_model_that_is_one_linear_or_has_none() -> None:
    with pytest.raises(ValueError, match="from_linear"):
        sparsify_(_sparse_linear(4, 4, 0.9))
    with pytest.raises(ValueError, match="hold no nn.Linear"):
        sparsify_(nn.Sequential(nn.Conv2d(1, 2, 3)))
