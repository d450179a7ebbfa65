"""The Pruner with granularity 'channel' and example inputs: group-aware masks, exact unit
counts, nesting, enforcement on every coupled parameter, resume; unit selection; group
criteria."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs as sc
from secateurs.schedules import Cubic
from secateurs.selection import select_units
from secateurs.structured import bn_penalty, compact_, models


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return models.ConvBN(width=8, classes=4, size=8), torch.randn(4, 1, 8, 8)


def _train(model: nn.Module, opt: torch.optim.Optimizer, pruner: sc.Pruner, steps: int,
           seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()


def test_a_channel_mask_covers_its_whole_group() -> None:
    model, x = _cnn()
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x)
    pruner.update()
    rows = pruner.masks["features.0.weight"].flatten(1).any(1)
    assert int(rows.sum()) == 4
    assert torch.equal(pruner.masks["features.1.weight"], rows)
    assert torch.equal(pruner.masks["features.1.bias"], rows)
    assert torch.equal(pruner.masks["features.4.weight"].flatten(2).any(2).any(0), rows)
    assert torch.count_nonzero(model.features[1].bias[~rows]) == 0
    assert pruner.sparsity() == pytest.approx(pruner.masks.sparsity(
        [t.name for t in pruner.targets]))
    assert "features.1.bias" not in [r.name for r in pruner.summary()]


def test_gradual_schedule_nests_and_keeps_every_coupled_weight_at_zero() -> None:
    model, x = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = Cubic(initial=0.0, final=0.75, begin_step=0, end_step=12)
    pruner = sc.Pruner(model, schedule, "l1", granularity="channel", example_inputs=x,
                       update_every=3, optimizer=opt)
    previous = {n: m.clone() for n, m in pruner.masks.items()}
    for _ in range(5):
        _train(model, opt, pruner, 3)
        for name, mask in pruner.masks.items():
            assert not bool((mask & ~previous[name]).any())  # nothing comes back
            assert torch.count_nonzero(pruner.masks.target(name).param[~mask]) == 0
            previous[name] = mask.clone()
    kept = {g.name: int((~g.off(pruner.masks)).sum()) for g in pruner.channel_groups}
    assert kept == {"features.0": 2, "features.4": 4, "head.1": 16}  # a quarter of 8, 16, 64


def test_resume_from_state_dict_equals_an_uninterrupted_run() -> None:
    def run(split: bool) -> dict[str, torch.Tensor]:
        model, x = _cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        make = lambda: sc.Pruner(model, Cubic(0.0, 0.5, 0, 6), "l1",  # noqa: E731
                                 granularity="channel", example_inputs=x, update_every=2,
                                 optimizer=opt)
        pruner = make()
        _train(model, opt, pruner, 4)
        if split:
            state = pruner.state_dict()
            pruner = make()
            pruner.load_state_dict(state)
        _train(model, opt, pruner, 4, seed=1)
        return dict(pruner.masks)

    a, b = run(False), run(True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_per_layer_sparsity_and_shared_groups_take_the_largest() -> None:
    torch.manual_seed(0)
    model = models.ResNetLike((4, 8), blocks=1, classes=3)
    x = torch.randn(1, 3, 8, 8)
    names = [t.name for t in sc.targets.resolve_targets(model)]
    sparsity = dict.fromkeys(names, 0.25)
    sparsity["stages.1.shortcut.0.weight"] = 0.5  # shares its group with stages.1.body.3
    pruner = sc.Pruner(model, sparsity, "l1", granularity="channel", example_inputs=x)
    pruner.update()
    kept = {g.name: (g.units, int((~g.off(pruner.masks)).sum())) for g in pruner.channel_groups}
    shared = next(g.name for g in pruner.channel_groups
                  if g.produces("stages.1.shortcut.0.weight"))
    assert kept[shared] == (8, 4)
    assert kept["stages.1.body.0"] == (8, 6)


def test_global_scope_ranks_all_groups_together() -> None:
    model, x = _cnn()
    pruner = sc.Pruner(model, 0.5, "l1", scope="global", granularity="channel",
                       example_inputs=x)
    pruner.update()
    kept = [int((~g.off(pruner.masks)).sum()) for g in pruner.channel_groups]
    total = sum(g.units for g in pruner.channel_groups)
    assert sum(kept) == total - round(0.5 * total) and all(k >= 1 for k in kept)


def test_invalid_channel_arguments_raise_before_any_change() -> None:
    model, x = _cnn()
    with pytest.raises(ValueError, match="granularity 'channel'"):
        sc.Pruner(model, 0.5, "magnitude", example_inputs=x)
    with pytest.raises(ValueError, match="no target has output channels"):
        sc.Pruner(nn.Linear(4, 3), 0.5, "l1", granularity="channel",
                  example_inputs=torch.randn(1, 4))
    with pytest.raises(ValueError, match="scope 'row'"):
        sc.Pruner(model, 0.5, "l1", scope="row", granularity="channel", example_inputs=x)


def test_group_l1_score_sums_every_coupled_slice() -> None:
    torch.manual_seed(0)
    model = models.MLP(3, (5,), 2)
    pruner = sc.Pruner(model, 0.4, "l1", granularity="channel",
                       example_inputs=torch.randn(1, 3))
    group = pruner.channel_groups[0]
    w0, b0, w2 = model[0].weight.abs(), model[0].bias.abs(), model[2].weight.abs()
    score = pruner.criterion.score_group(group, model)
    torch.testing.assert_close(score.float(), (w0.sum(1) + b0 + w2.sum(0)).detach())
    pruner.update()
    assert torch.equal(model[0].bias.detach() != 0, score >= score.sort().values[2])


def test_l2_and_bn_scale_scores() -> None:
    model, x = _cnn()
    with torch.no_grad():
        model.features[1].weight.copy_(torch.linspace(-1, 1, 8))
    pruner = sc.Pruner(model, 0.5, "bn_scale", granularity="channel", example_inputs=x,
                       targets=["features.0"])
    pruner.update()
    assert torch.equal(pruner.masks["features.1.weight"],
                       model.features[1].weight.detach().abs() > 0.4)
    l2 = sc.criteria.get_criterion("l2")
    group = pruner.channel_groups[0]
    expected = sum(model.get_parameter(p).detach().square().movedim(0, 0).flatten(1).sum(1)
                   if model.get_parameter(p).dim() > 1 else model.get_parameter(p).detach()
                   .square() for p in ("features.0.weight", "features.1.weight",
                                       "features.1.bias"))
    expected = expected + model.features[4].weight.detach().square().sum((0, 2, 3))
    torch.testing.assert_close(l2.score_group(group, model).float(), expected.sqrt())
    assert bn_penalty(model) > 0


def test_bn_scale_needs_batchnorm_and_channels() -> None:
    model = models.MLP(3, (5,), 2)
    # Both are refused when the pruner is built, before any step.
    with pytest.raises(ValueError, match="BatchNorm"):
        sc.Pruner(model, 0.4, "bn_scale", granularity="channel",
                  example_inputs=torch.randn(1, 3))
    with pytest.raises(TypeError, match="whole channel groups"):
        sc.Pruner(model, 0.4, "bn_scale")


@pytest.mark.parametrize("criterion", ["contribution", "taylor"])
def test_data_criteria_score_groups_from_training_batches(criterion: str) -> None:
    model, x = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = sc.Pruner(model, Cubic(0.0, 0.5, 1, 4), criterion, granularity="channel",
                       example_inputs=x, optimizer=opt)
    _train(model.train(), opt, pruner, 5)
    pruner.close()
    model.eval()
    with torch.no_grad():
        masked = model(x)
    compact_(model, x, pruner.masks)
    assert model.features[0].out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4),
       s1=st.floats(0, 0.95), s2=st.floats(0, 0.95), scope=st.sampled_from(["layer", "global"]),
       seed=st.integers(0, 1000))
def test_select_units_counts_nests_and_keeps_one(sizes: list[int], s1: float, s2: float,
                                                 scope: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = {f"g{i}": torch.rand(n, generator=g) for i, n in enumerate(sizes)}
    low, high = sorted((s1, s2))
    first = select_units(scores, dict.fromkeys(scores, low), scope)
    second = select_units(scores, dict.fromkeys(scores, high), scope, previous=first)
    for name, n in zip(scores, sizes, strict=True):
        assert bool(second[name].any())
        assert not bool((second[name] & ~first[name]).any())
        if scope == "layer":
            assert int(second[name].sum()) == max(1, n - round(high * n))
    if scope == "global":
        total = sum(sizes)
        removed = total - sum(int(k.sum()) for k in second.values())
        assert abs(removed - round(high * total)) <= len(sizes)
