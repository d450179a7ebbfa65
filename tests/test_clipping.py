from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from secateurs import clip_


@given(st.floats(0.01, 2.0), st.integers(0, 1000))
def test_value_clipping_bounds_every_target_weight(c, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    bias = model[0].bias.detach().clone()
    clip_(model, value=c)
    for layer in model:
        assert layer.weight.abs().max() <= c
    assert torch.equal(model[0].bias, bias)  # only targets are clipped


@given(st.floats(0.1, 3.0), st.integers(0, 1000))
def test_max_norm_caps_each_neuron_and_keeps_direction(c, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(16, 8)
    before = layer.weight.detach().clone()
    clip_(nn.Sequential(layer), max_norm=c)
    norms = layer.weight.norm(dim=1)
    assert torch.all(norms <= c * (1 + 1e-5))
    small = before.norm(dim=1) <= c
    assert torch.allclose(layer.weight[small], before[small])
    cos = nn.functional.cosine_similarity(layer.weight, before, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_conv_filters_are_capped_whole():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.mul_(100)
    clip_(nn.Sequential(conv), max_norm=1.0)
    assert torch.all(conv.weight.flatten(1).norm(dim=1) <= 1.0 + 1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "needs value=, max_norm="),
    ({"value": 0.0}, r"value must be a finite number in \(0, inf\), got 0.0"),
    ({"max_norm": float("nan")}, "max_norm must be"),
    ({"value": 1.0, "targets": "nothing"}, "matched no parameter"),
])
def test_bad_arguments(kwargs, message):
    model = nn.Sequential(nn.Linear(2, 2))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        clip_(model, **kwargs)
    assert torch.equal(before, model[0].weight)
