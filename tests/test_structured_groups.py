"""Channel groups found through Torch-Pruning: what couples, what is fixed, and the
bookkeeping between units, slices and masks."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateurs.structured import Structure, discover, models


def _groups(model: nn.Module, x: torch.Tensor) -> dict:
    return {g.name: g for g in discover(model, x).groups}


def _params(group) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"out": set(), "in": set()}
    for s in group.slices:
        out[s.role].add(s.param)
    return out


def test_conv_batchnorm_conv_and_flatten_into_linear() -> None:
    groups = _groups(models.ConvBN(width=4, classes=3, size=8), torch.randn(1, 1, 8, 8))
    first = _params(groups["features.0"])
    assert first == {"out": {"features.0.weight", "features.1.weight", "features.1.bias"},
                     "in": {"features.4.weight"}}
    second = groups["features.4"]
    flat = next(s for s in second.slices if s.param == "head.1.weight")
    # Each of the 8 channels reaches its 2x2 block of the flattened features.
    assert flat.dim == 1 and len(flat.index) == 8 * 4
    assert torch.equal(flat.channel.sort().values, torch.arange(8).repeat_interleave(4))


def test_residual_additions_couple_both_branches_and_the_strided_shortcut() -> None:
    model = models.ResNetLike((4, 8), blocks=2, classes=3)
    groups = _groups(model, torch.randn(1, 3, 8, 8))
    stage2 = next(g for g in groups.values() if g.produces("stages.2.shortcut.0.weight"))
    out = _params(stage2)["out"]
    assert {"stages.2.body.3.weight", "stages.2.body.4.weight", "stages.2.shortcut.1.weight",
            "stages.3.body.3.weight", "stages.3.body.4.bias"} <= out
    assert {"stages.3.body.0.weight", "fc.weight"} <= _params(stage2)["in"]
    inner = groups["stages.2.body.0"]  # inside a block: the next conv's columns only
    assert _params(inner) == {"out": {"stages.2.body.0.weight", "stages.2.body.1.weight",
                                      "stages.2.body.1.bias"},
                              "in": {"stages.2.body.3.weight"}}
    assert all(g.prunable for n, g in groups.items() if n != "fc")
    assert groups["fc"].fixed is not None and "outputs of the model" in groups["fc"].fixed


def test_depthwise_convolution_follows_its_expansion() -> None:
    groups = _groups(models.MobileNetLike(width=4, expand=2), torch.randn(1, 3, 8, 8))
    expansion = next(g for g in groups.values() if g.produces("blocks.0.body.0.weight"))
    assert expansion.produces("blocks.0.body.3.weight")  # the depthwise filters
    assert "blocks.0.body.6.weight" in _params(expansion)["in"]


def test_attention_units_are_whole_heads_and_layernorm_widths_are_fixed() -> None:
    model = models.TransformerClassifier(6, dim=16, num_heads=4, hidden=24, classes=3)
    groups = discover(model, torch.randn(2, 5, 6)).groups
    attn = next(g for g in groups if g.produces("blocks.0.attn.q.weight"))
    assert attn.produces("blocks.0.attn.k.weight") and attn.produces("blocks.0.attn.v.weight")
    assert "blocks.0.attn.out.weight" in _params(attn)["in"]
    assert attn.units == 4
    assert torch.equal(attn.unit_of, torch.arange(16) // 4)
    assert [h.attribute for h in attn.heads] == ["num_heads"]
    stream = next(g for g in groups if g.produces("embed.weight"))
    assert stream.fixed is not None and "LayerNorm" in stream.fixed
    mlp = next(g for g in groups if g.produces("blocks.0.fc1.weight"))
    assert mlp.prunable and mlp.units == 24


def test_grouped_convolution_ties_the_same_channel_of_every_group() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 3, groups=2),
                          nn.Flatten(), nn.Linear(6, 2))
    groups = _groups(model, torch.randn(1, 3, 3, 3))
    # Input j of the grouped conv is column j % 4: channels j and j + 4 go together.
    assert torch.equal(groups["0"].unit_of, torch.arange(8) % 4)
    assert torch.equal(groups["2"].unit_of, torch.arange(6) % 3)


def test_discovery_leaves_the_model_its_mode_and_its_hooks() -> None:
    model = models.MLP(4, (6,), 2).train()
    calls = []
    model[0].register_forward_hook(lambda *_: calls.append(1))
    discover(model, torch.randn(2, 4))
    assert model.training and calls == []
    assert all(p.grad is None for p in model.parameters())


def test_untraceable_inputs_raise_a_clear_error() -> None:
    with pytest.raises(ValueError, match="could not trace MLP"):
        discover(models.MLP(4, (6,), 2), torch.randn(2, 5))


@functools.lru_cache(maxsize=1)
def _attention_structure() -> Structure:
    model = models.TransformerClassifier(6, dim=8, num_heads=4, hidden=12, classes=3)
    return discover(model, torch.randn(1, 3, 6))


@settings(max_examples=20, deadline=None)
@given(keep=st.lists(st.booleans(), min_size=4, max_size=4))
def test_keep_masks_and_off_are_inverse(keep: list[bool]) -> None:
    structure = _attention_structure()
    attn = next(g for g in structure.groups if g.heads)
    keep_t = torch.tensor(keep)
    masks = attn.keep_masks(keep_t, structure.shapes)
    assert torch.equal(attn.off(masks), ~keep_t if masks else torch.zeros(4, dtype=torch.bool))


def test_reduce_sums_each_units_slices() -> None:
    model = models.MLP(3, (4,), 2)
    group = _groups(model, torch.randn(1, 3))["0"]
    scores = {n: p.detach().abs() for n, p in model.named_parameters()}
    expected = scores["0.weight"].sum(1) + scores["0.bias"] + scores["2.weight"].sum(0)
    torch.testing.assert_close(group.reduce(scores).float(), expected)
    assert torch.equal(group.reduce({}), torch.zeros(4, dtype=torch.float64))
