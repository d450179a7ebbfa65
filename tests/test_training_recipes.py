"""Training recipes: one validated YAML description of pruning while a model trains, taken by
the Trainer, Lightning and Accelerate doors and by a hand-written loop alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateurs import Pruner
from secateurs.criteria import available_criteria
from secateurs.recipes import Recipe, RecipeError, ScheduleOptions, TrainingRecipe
from secateurs.recipes.schema import TRAINING_FIELDS
from secateurs.recipes.training import _KINDS
from secateurs.schedules import Cosine, Cubic, Linear

YAML = """
criterion: magnitude
sparsity: 0.75
schedule: {kind: cubic, initial: 0.0, begin_step: 2, end_step: 10}
update_every: 2
scope: layer
exclude: '^4\\.'
"""


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def train(net: nn.Module, pruner: Pruner, opt: torch.optim.Optimizer, steps: int = 14) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        pruner.step()


def test_a_yaml_recipe_builds_the_pruner_it_says_and_trains_like_one_built_by_hand() -> None:
    recipe = TrainingRecipe.from_yaml_text(YAML)
    a = model()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    pruner = recipe.pruner(a, opt_a)
    assert [t.name for t in pruner.targets] == ["0.weight", "2.weight"]  # 4.* excluded
    assert pruner.update_every == 2
    train(a, pruner, opt_a)
    assert pruner.sparsity() == pytest.approx(0.75, abs=0.01)

    b = model()
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    by_hand = Pruner(b, Cubic(0.0, 0.75, begin_step=2, end_step=10), "magnitude",
                     targets=["0.weight", "2.weight"], update_every=2, optimizer=opt_b)
    train(b, by_hand, opt_b)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_a_recipe_repeats_itself_through_yaml(tmp_path: Path) -> None:
    recipe = TrainingRecipe.from_yaml_text(YAML)
    recipe.to_yaml(tmp_path / "r.yaml")
    again = TrainingRecipe.from_yaml(tmp_path / "r.yaml")
    assert again == recipe
    assert again.to_dict()["schedule"] == {"kind": "cubic", "initial": 0.0, "begin_step": 2,
                                           "end_step": 10}
    assert recipe.replace(update_every=5).update_every == 5


def test_per_target_sparsity_gives_each_target_its_own_schedule() -> None:
    recipe = TrainingRecipe(sparsity={"^0\\.": 0.5, ".": 0.9},
                            schedule={"end_step": 4}, update_every=1)
    args = recipe.pruner_arguments(model())
    assert args["sparsity"]["0.weight"](4) == pytest.approx(0.5)
    assert args["sparsity"]["2.weight"](4) == pytest.approx(0.9)
    assert args["sparsity"]["2.weight"](0) == 0.0


def test_without_a_schedule_the_final_sparsity_holds_from_the_first_update() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    pruner = TrainingRecipe(sparsity=0.5, update_every=1).pruner(net, opt)
    train(net, pruner, opt, steps=1)
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.01)


def test_n_m_without_sparsity_means_one_minus_n_over_m() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    pruner = TrainingRecipe(granularity="2:4", update_every=1).pruner(net, opt)
    train(net, pruner, opt, steps=2)
    for t in pruner.targets:
        kept = pruner.masks[t.name].reshape(-1, 4).sum(1)
        assert torch.all(kept == 2), t.name


BAD: list[tuple[dict[str, Any], str]] = [
    ({"reconstruct": True}, "unknown field 'reconstruct'; valid fields: version, criterion"),
    ({"schedule": {"end_step": 10, "every": 3}}, "unknown field 'schedule.every'; valid "
                                                 "fields: kind, initial, begin_step, end_step"),
    ({"schedule": {"begin_step": 3}}, "field 'schedule.end_step' is required"),
    ({"schedule": {"begin_step": 10, "end_step": 10}}, "must be greater than begin_step (10)"),
    ({"schedule": {"kind": "exp", "end_step": 10}}, "field 'schedule.kind': got 'exp'"),
    ({"sparsity": 0.3, "schedule": {"initial": 0.5, "end_step": 10}},
     "field 'schedule.initial': got 0.5: must not exceed the final sparsity (0.3)"),
    ({"granularity": "2:4", "schedule": {"end_step": 10}}, "no sparsity to schedule"),
    ({"sparsity": 1.0}, "field 'sparsity': got 1.0: must be a number in [0, 1)"),
    ({"update_every": 0}, "field 'update_every': got 0"),
    ({"scope": "global", "sparsity": {".": 0.5}}, "needs one number sparsity"),
    ({"criterion": "nope"}, "unknown criterion 'nope'"),
    ({"criterion": "bn_scale"}, "field 'criterion': got 'bn_scale': scores whole channel"),
    ({"criterion_options": {"frobnicate": 1}}, "options of criterion 'magnitude' rejected"),
    ({"update_every": "5"}, "field 'update_every': got '5'"),
]


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_a_wrong_field_is_named_with_its_value_and_what_is_valid(fields: dict[str, Any],
                                                                  message: str) -> None:
    with pytest.raises(RecipeError) as info:
        TrainingRecipe.from_dict(fields, source=" in 'r.yaml'")
    assert message in str(info.value)
    assert str(info.value).endswith(" in 'r.yaml'")


@pytest.mark.parametrize("name", available_criteria())
def test_every_registered_criterion_trains_under_a_recipe_or_is_refused_by_it(name: str) -> None:
    try:
        recipe = TrainingRecipe(criterion=name, sparsity=0.5, update_every=2)
    except RecipeError as err:
        assert name in str(err) and "field 'criterion'" in str(err)
        return
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    pruner = recipe.pruner(net, opt)
    train(net, pruner, opt, steps=6)
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.01)


def test_a_one_shot_recipe_refuses_training_fields_and_says_which_recipe_takes_them() -> None:
    assert set(TRAINING_FIELDS) == set(TrainingRecipe.model_fields) - set(Recipe.model_fields)
    assert set(TrainingRecipe().pruner_arguments(model())) == TrainingRecipe.PRUNER_ARGUMENTS
    with pytest.raises(RecipeError, match="field 'schedule' belongs to a training recipe"):
        Recipe.from_dict({"schedule": {"end_step": 10}})
    with pytest.raises(RecipeError, match="field 'update_every' belongs to a training recipe"):
        Recipe.from_yaml_text("update_every: 3")


def test_a_recipe_that_leaves_no_target_is_refused_before_any_weight_changes() -> None:
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="excludes every target"):
        TrainingRecipe(exclude=".").pruner(net)
    with pytest.raises(ValueError, match="no pattern of"):
        TrainingRecipe(sparsity={"^0\\.": 0.5}).pruner(net)
    with pytest.raises(TypeError, match="the recipe sets scope"):
        TrainingRecipe().pruner(net, scope="global")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_every_schedule_kind_builds_its_schedule_class() -> None:
    # The names YAML may give are exactly the registered ones.
    assert set(get_args(ScheduleOptions.model_fields["kind"].annotation)) == set(_KINDS)
    assert {"cubic": Cubic, "linear": Linear, "cosine": Cosine}.items() <= _KINDS.items()
    for kind, cls in _KINDS.items():
        built = ScheduleOptions(kind=kind, initial=0.1, begin_step=3, end_step=9).build(0.7)
        assert built == cls(initial=0.1, final=0.7, begin_step=3, end_step=9)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(_KINDS)), initial=st.floats(0.0, 0.5),
       final=st.floats(0.5, 0.99), begin=st.integers(0, 50), length=st.integers(1, 50),
       step=st.integers(0, 120))
def test_the_schedule_of_a_recipe_is_the_schedule_it_names(kind: str, initial: float,
                                                           final: float, begin: int,
                                                           length: int, step: int) -> None:
    recipe = TrainingRecipe(sparsity=final, schedule={
        "kind": kind, "initial": initial, "begin_step": begin, "end_step": begin + length})
    schedule = recipe.pruner_arguments(model())["sparsity"]
    expected = _KINDS[kind](initial=initial, final=final, begin_step=begin,
                            end_step=begin + length)
    assert schedule(step) == expected(step)
    assert initial - 1e-12 <= schedule(step) <= final + 1e-12
