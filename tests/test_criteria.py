"""Conformance matrix: every registered criterion passes the same checks."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import train_steps
from secateurs import Pruner, available_criteria, register_criterion
from secateurs.criteria import Criterion, Magnitude, get_criterion
from secateurs.criteria import base as criteria_base
from secateurs.targets import resolve_targets


def test_registry_lists_the_builtin_criteria():
    assert {"magnitude", "random", "clipping"} <= set(available_criteria())


@pytest.mark.parametrize("name", ["magnitude", "random", "clipping"])
def test_scores_are_shaped_like_the_target_and_side_effect_free(mlp, name):
    crit = get_criterion(name)
    before = copy.deepcopy(mlp.state_dict())
    for t in resolve_targets(mlp):
        s = crit.score(t)
        assert s.shape == t.param.shape and s.dtype.is_floating_point
        assert torch.isfinite(s).all()
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


@pytest.mark.parametrize("name", ["magnitude", "random", "clipping"])
def test_every_criterion_reaches_the_target_under_training(mlp, name):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(mlp, 0.6, name, optimizer=opt)
    train_steps(mlp, opt, 10, after_step=pruner.step)
    assert pruner.sparsity() == pytest.approx(0.6, abs=1e-2)
    for t in pruner.targets:
        assert torch.all(t.param[~pruner.masks[t.name]] == 0)


def test_magnitude_scores_are_absolute_values(mlp):
    t = resolve_targets(mlp)[0]
    assert torch.equal(Magnitude().score(t), t.param.detach().abs())


def test_random_is_reproducible_from_its_state(mlp):
    a, b = get_criterion("random", seed=3), get_criterion("random", seed=3)
    t = resolve_targets(mlp)[0]
    a.score(t)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.score(t), b.score(t))


def test_unknown_name_lists_the_registry():
    with pytest.raises(ValueError, match="registered criteria: .*magnitude.*random"):
        get_criterion("l0")


def test_options_only_with_a_name():
    with pytest.raises(TypeError, match="only to a criterion given by name"):
        get_criterion(Magnitude(), seed=1)


@pytest.fixture
def registry():
    """Snapshot the criterion registry and restore it afterwards, so a criterion a test
    registers does not leak into later tests (or into the conformance matrix)."""
    saved = dict(criteria_base._REGISTRY)
    yield criteria_base._REGISTRY
    criteria_base._REGISTRY.clear()
    criteria_base._REGISTRY.update(saved)


def test_user_criteria_register_and_run(mlp, registry):
    @register_criterion("test-negated-magnitude")
    class Negated(Criterion):
        def score(self, target):
            return -target.param.detach().abs()

    assert "test-negated-magnitude" in available_criteria()
    pruner = Pruner(mlp, 0.5, "test-negated-magnitude")
    before = {t.name: t.param.detach().clone() for t in pruner.targets}
    pruner.step()
    # Scope 'layer': within each target the kept scores dominate the pruned ones, so every
    # kept weight was at most as large in magnitude as every pruned one.
    for t in pruner.targets:
        mask, w = pruner.masks[t.name], before[t.name]
        assert 0 < int((~mask).sum()) < mask.numel()
        assert w.abs()[mask].max() <= w.abs()[~mask].min(), t.name
        assert torch.all(t.param[~mask] == 0)
        assert torch.equal(t.param[mask], w[mask])
    assert isinstance(get_criterion("test-negated-magnitude"), Negated)
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("magnitude")(Negated)
    assert registry["magnitude"] is Magnitude


def test_the_registry_fixture_removes_what_a_test_registered():
    # Runs after test_user_criteria_register_and_run (file order): its criterion is gone.
    assert "test-negated-magnitude" not in available_criteria()
