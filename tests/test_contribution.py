"""Data-aware criteria: contribution (|w| * ||x||_p, Wanda at p=2) and first-order Taylor."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from secateurs import Pruner
from secateurs.criteria import Contribution, Taylor, available_criteria, get_criterion
from secateurs.oneshot import prune_
from secateurs.schedules import Linear
from secateurs.selection import nm_layout
from secateurs.targets import resolve_targets

W = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                  [0.5, 0.5, -1.0, 2.0],
                  [-3.0, 1.0, 0.0, 1.0]])
X = torch.tensor([[1.0, 0.0, -2.0, 1.0],
                  [3.0, -1.0, 0.0, 1.0]])


def layer() -> nn.Linear:
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def test_registered_by_name():
    assert {"contribution", "taylor"} <= set(available_criteria())
    assert isinstance(get_criterion("contribution"), Contribution)
    assert get_criterion("contribution").p == 2.0


def test_hand_checked_scores_p1():
    lin = layer()
    crit = Contribution(p=1)
    crit.calibrate(lin, resolve_targets(lin), [X[:1], X[1:]])
    # mean_n |x_nj| = [2, 0.5, 1, 1]; score = |w_ij| * that (= sum_n |w_ij x_nj| / N).
    expected = torch.tensor([[2.0, 1.0, 3.0, 4.0],
                             [1.0, 0.25, 1.0, 2.0],
                             [6.0, 0.5, 0.0, 1.0]])
    score = crit.score(resolve_targets(lin)[0])
    torch.testing.assert_close(score, expected)
    torch.testing.assert_close(score * 2, (W.unsqueeze(0) * X.unsqueeze(1)).abs().sum(0))


def test_hand_checked_scores_p2():
    lin = layer()
    crit = Contribution(p=2)
    crit.calibrate(lin, resolve_targets(lin), [X])
    # sqrt(mean_n x_nj^2) = [sqrt 5, sqrt 0.5, sqrt 2, 1] (Wanda's ||x_j||_2 / sqrt N).
    r5, rh, r2 = math.sqrt(5), math.sqrt(0.5), math.sqrt(2)
    expected = torch.tensor([[r5, 2 * rh, 3 * r2, 4.0],
                             [0.5 * r5, 0.5 * rh, r2, 2.0],
                             [3 * r5, rh, 0.0, 1.0]])
    torch.testing.assert_close(crit.score(resolve_targets(lin)[0]), expected)


def test_invalid_p_and_missing_statistics_are_named():
    with pytest.raises(ValueError, match="p must be"):
        Contribution(p=0.5)
    with pytest.raises(ValueError, match="no statistics for target 'weight'"):
        Contribution().score(resolve_targets(layer())[0])
    with pytest.raises(ValueError, match="decay"):
        Contribution(decay=1.0)


@given(rows=st.integers(1, 8), cols=st.integers(1, 12), s=st.floats(0.0, 0.95),
       seed=st.integers(0, 1000))
def test_row_scope_gives_the_same_zero_count_in_every_row(rows, cols, s, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cols, rows)
    xs = [torch.randn(5, cols, generator=g) * torch.rand(cols, generator=g)]
    report = prune_(lin, s, "contribution", xs, scope="row", progress=False)
    zeros = (~report.masks["weight"]).sum(1)
    assert bool((zeros == round(s * cols)).all())
    assert bool((lin.weight[~report.masks["weight"]] == 0).all())


@pytest.mark.parametrize("nm", ["2:4", "1:4", "3:8"])
@pytest.mark.parametrize("reconstruct", [False, True])
def test_nm_holds_in_every_group(nm, reconstruct):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    xs = [torch.randn(32, 16) for _ in range(2)]
    prune_(model, None, "contribution", xs, granularity=nm, reconstruct=reconstruct,
           progress=False)
    n, m = map(int, nm.split(":"))
    for lin in (model[0], model[2]):
        kept = (nm_layout(lin.weight, m) != 0).sum(1)
        assert bool((kept <= n).all()) and int(kept.max()) == n


def skewed_data(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs whose first feature is 100x larger than the others."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(16)
    scale[0] = 100.0
    return [(torch.randn(8, 16, generator=g) * scale, torch.randint(0, 4, (8,), generator=g))
            for _ in range(steps)]


def train(model: nn.Module, opt: torch.optim.Optimizer, pruner: Pruner,
          data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()


def test_pruner_masks_follow_the_data_not_the_magnitudes(mlp):
    with torch.no_grad():
        w = mlp[0].weight
        w.copy_(w.sign() * (w.abs() + 0.05))
        w[:, 0] = 0.02  # the smallest weights, on the loudest input feature
    masks = {}
    for crit in ("magnitude", "contribution"):
        model = copy.deepcopy(mlp)
        with Pruner(model, 0.5, crit, scope="row", targets=["0"]) as pruner:
            model(skewed_data(1)[0][0])
            pruner.step()
            masks[crit] = pruner.masks["0.weight"].clone()
    assert not bool(masks["magnitude"][:, 0].any())  # magnitude prunes feature 0 everywhere
    assert bool(masks["contribution"][:, 0].all())  # contribution keeps it everywhere


def test_pruner_statistics_are_an_average_of_training_batches_only():
    lin = layer()
    crit = Contribution(p=1, decay=0.5, every=2)
    crit.bind(lin, resolve_targets(lin))
    ones, threes = torch.ones(2, 4), torch.full((2, 4), 3.0)
    lin(ones)          # observed (first call)
    lin(threes * 100)  # skipped (every=2)
    lin(threes)        # observed: 0.5 * 1 + 0.5 * 3
    lin.eval()
    lin(threes * 100)  # eval mode: ignored
    torch.testing.assert_close(crit.state_dict()["values"]["weight"],
                               torch.full((4,), 2.0, dtype=torch.float64))
    crit.close()
    assert not lin._forward_pre_hooks


def run_with_resume(mlp: nn.Module, crit_factory, interrupt: int | None, steps: int = 12):
    data = skewed_data(steps, seed=1)
    model = copy.deepcopy(mlp)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = Pruner(model, Linear(0.0, 0.8, end_step=steps - 2), crit_factory(), update_every=3,
                    optimizer=opt)
    if interrupt is None:
        train(model, opt, pruner, data)
        return model, pruner
    train(model, opt, pruner, data[:interrupt])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), pruner.state_dict()))
    pruner.close()
    model = copy.deepcopy(mlp)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = Pruner(model, Linear(0.0, 0.8, end_step=steps - 2), crit_factory(), update_every=3,
                    optimizer=opt)
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    pruner.load_state_dict(saved[2])
    train(model, opt, pruner, data[interrupt:])
    return model, pruner


@pytest.mark.parametrize("factory", [lambda: Contribution(every=2), lambda: Taylor()],
                         ids=["contribution", "taylor"])
def test_interrupted_and_resumed_run_equals_uninterrupted_bit_for_bit(mlp, factory):
    straight, p1 = run_with_resume(mlp, factory, None)
    resumed, p2 = run_with_resume(mlp, factory, 7)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    for name in p1.masks:
        assert torch.equal(p1.masks[name], p2.masks[name])
    assert 0.7 < p1.sparsity() < 0.9


def test_state_of_another_p_is_refused():
    lin = layer()
    crit = Contribution(p=1)
    crit.calibrate(lin, resolve_targets(lin), [X])
    with pytest.raises(ValueError, match="options"):
        Contribution(p=2).load_state_dict(crit.state_dict())


def test_taylor_hand_checked_and_under_a_pruner():
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0, 0.5]]))
    xs = [torch.tensor([[1.0, -2.0, 0.0]]), torch.tensor([[-1.0, -1.0, 4.0]])]
    crit = Taylor(loss=lambda model, x: model(x).sum())
    target = resolve_targets(lin)[0]
    crit.calibrate(lin, [target], xs)
    # dL_b/dw = x_b; mean_b |w * x_b| = |w| * [1, 1.5, 2].
    torch.testing.assert_close(crit.score(target), torch.tensor([[2.0, 1.5, 1.0]]))
    with Pruner(lin, 0.3, Taylor(), targets=["weight"]) as pruner:
        lin(xs[1]).sum().backward()
        pruner.step()
        torch.testing.assert_close(pruner.criterion.score(target),
                                   torch.tensor([[2.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="needs a loss"):
        Taylor().calibrate(lin, [target], xs)
