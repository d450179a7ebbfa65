"""Recipes: validation that names the field, YAML round trips, bit-for-bit repeats, OWL."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateurs.recipes import (
    Recipe,
    RecipeError,
    default_targets,
    outlier_ratios,
    owl_allocation,
    recipe_sparsity,
    recipe_targets,
)
from secateurs.targets import resolve_targets
from test_oneshot import TinyEncoder, encoder_batches, state

BAD = [
    ("version", 2, "field 'version': got 2"),
    ("criterion", "nope", "unknown criterion 'nope'; registered criteria:"),
    ("criterion", "taylor", "field 'criterion': got 'taylor': needs a loss function"),
    ("criterion_options", {"p": 0.5}, "field 'criterion_options': got {'p': 0.5}"),
    ("criterion_options", {"q": 1}, "unexpected keyword argument 'q'"),
    ("sparsity", 1.0, r"field 'sparsity': got 1.0: must be a number in \[0, 1\)"),
    ("sparsity", -0.1, "field 'sparsity': got -0.1"),
    ("sparsity", True, "field 'sparsity': got True"),
    ("sparsity", "half", "field 'sparsity': got 'half'"),
    ("sparsity", {"q_proj": 1.2}, "field 'sparsity.q_proj': got 1.2"),
    ("sparsity", {"(": 0.2}, r"field 'sparsity.\(': got '\(': not a valid regular expression"),
    ("sparsity", None, "field 'sparsity': got None: null means 1 - N/M"),
    ("allocation", "even", "field 'allocation': got 'even'"),
    ("owl", {"threshold": 0}, "field 'owl.threshold': got 0"),
    ("owl", {"spread": 1.0}, "field 'owl.spread': got 1.0"),
    ("owl", {"m": 5}, "unknown field 'owl.m'; valid fields: threshold, spread"),
    ("granularity", "channel", "field 'granularity': got 'channel'"),
    ("granularity", "4:4", "needs 1 <= N < M"),
    ("scope", "diagonal", "field 'scope': got 'diagonal'"),
    ("targets", "(", "field 'targets': got '\\(': '\\(' is not a valid regular expression"),
    ("targets", [], "field 'targets': got \\[\\]: an empty list"),
    ("targets", 3, "field 'targets': got 3"),
    ("exclude", "[", "field 'exclude'"),
    ("reconstruct", "yes", "field 'reconstruct': got 'yes'"),
    ("reconstruct", {"refine": -1}, "field 'reconstruct.refine': got -1"),
    ("reconstruct", {"block_size": 0}, "field 'reconstruct.block_size': got 0"),
    ("reconstruct", {"percdamp": -1.0}, "field 'reconstruct.percdamp': got -1.0"),
    ("sequential", "no", "field 'sequential': got 'no'"),
    ("measure_error", 1, "field 'measure_error': got 1"),
    ("calibration", {"samples": 0}, "field 'calibration.samples': got 0"),
    ("calibration", {"sequence_length": "long"}, "field 'calibration.sequence_length'"),
    ("calibration", {"batch_size": 1.5}, "field 'calibration.batch_size': got 1.5"),
    ("calibration", {"seed": -1}, "field 'calibration.seed': got -1"),
    ("calibration", {"sample": 4}, "unknown field 'calibration.sample'"),
    ("sparsty", 0.5, "unknown field 'sparsty'; valid fields: version, criterion"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_every_wrong_field_is_named_with_its_value(field, value, message):
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.from_dict({field: value})
    assert isinstance(info.value, ValueError)
    assert "pydantic" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("fields", "message"), [
    ({"granularity": "2:4", "sparsity": 0.6}, r"got 0.6: must be a number in \[0, 0.5\]"),
    ({"allocation": "owl", "granularity": "2:4"}, "field 'allocation': got 'owl'"),
    ({"allocation": "owl", "sparsity": {".": 0.5}}, "field 'allocation'"),
    ({"scope": "global"}, "field 'scope': got 'global': .* sequential: false"),
])
def test_fields_that_contradict_each_other(fields, message):
    with pytest.raises(RecipeError, match=message):
        Recipe(**fields)


def test_yaml_round_trip_and_defaults(tmp_path):
    assert Recipe.from_yaml_text("") == Recipe()
    nm = Recipe.from_yaml_text("granularity: 2:4\nreconstruct: true\n")
    assert nm.sparsity is None and nm.reconstruct is not None and nm.reconstruct.refine == 20
    recipe = Recipe(sparsity={"attention": 0.4, ".": 0.6}, criterion_options={"p": 1.0},
                    reconstruct={"refine": 5}, sequential=False, calibration={"samples": 7})
    path = tmp_path / "recipe.yaml"
    recipe.to_yaml(path)
    assert Recipe.from_yaml(path) == recipe
    assert recipe.replace(scope="layer").scope == "layer"
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping of fields, got list"):
        Recipe.from_yaml(tmp_path / "list.yaml")
    with pytest.raises(RecipeError, match="cannot read recipe"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("sparsity: [0.5\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        Recipe.from_yaml(tmp_path / "broken.yaml")


def test_the_written_recipe_repeats_the_run_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    first = TinyEncoder().eval()
    second = copy.deepcopy(first)
    recipe = Recipe(sparsity=0.5, reconstruct=True, allocation="owl", owl={"spread": 0.1})
    report = recipe.apply(first, encoder_batches(3, 0), progress=False)
    recipe.to_yaml(tmp_path / "recipe.yaml")
    again = Recipe.from_yaml(tmp_path / "recipe.yaml").apply(second, encoder_batches(3, 0),
                                                             progress=False)
    assert report.mode == again.mode == "blocks"
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_sparsity_patterns_and_exclude():
    torch.manual_seed(0)
    encoder = TinyEncoder().eval()
    recipe = Recipe(sparsity={r"\.(up|down)\.": 0.7, ".": 0.3}, exclude=r"layers\.0\.")
    targets = recipe_targets(recipe, encoder)
    assert targets[0].name == "layers.1.query.weight" and len(targets) == 12
    levels = recipe_sparsity(recipe, encoder, targets, [])
    assert levels["layers.1.up.weight"] == 0.7 and levels["layers.2.key.weight"] == 0.3
    before = state(encoder)
    with pytest.raises(ValueError, match="no pattern of \\['up'\\] matches target"):
        Recipe(sparsity={"up": 0.5}).apply(encoder, encoder_batches(2, 0), progress=False)
    with pytest.raises(ValueError, match="excludes every target"):
        Recipe(exclude=".").apply(encoder, encoder_batches(2, 0), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


def test_default_targets_leave_heads_and_embeddings_dense():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, num_hidden_layers=2, num_attention_heads=2, hidden_size=16,
        intermediate_size=32, num_key_value_heads=1))
    names = [t.name for t in default_targets(llama)]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_layer=2, n_head=2, n_embd=16, n_positions=16))
    assert all(t.name.startswith("transformer.h.") for t in default_targets(gpt2))
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [t.name for t in default_targets(mlp)] == ["0.weight", "2.weight"]


def test_owl_allocation_follows_the_paper_and_keeps_the_mean():
    ratios = {"a": 0.01, "b": 0.03, "c": 0.02}
    sizes = dict.fromkeys(ratios, 10)
    levels = owl_allocation(ratios, sizes, 0.5, 0.08)
    # Densities 0, 0.16, 0.08 shifted to mean 0.5: sparsities 0.58, 0.42, 0.5.
    assert levels == pytest.approx({"a": 0.58, "b": 0.42, "c": 0.5})
    assert owl_allocation(dict.fromkeys("xy", 0.02), {"x": 1, "y": 3}, 0.6, 0.1) == \
        pytest.approx({"x": 0.6, "y": 0.6})
    weighted = owl_allocation(ratios, {"a": 10, "b": 30, "c": 60}, 0.5, 0.08)
    mean = sum(weighted[k] * n for k, n in {"a": 10, "b": 30, "c": 60}.items()) / 100
    assert mean == pytest.approx(0.5)


def test_a_block_with_outlier_features_is_pruned_less():
    torch.manual_seed(0)
    encoder = TinyEncoder().eval()
    batches = encoder_batches(2, 0)
    with torch.no_grad():
        encoder.layers[1].up.weight[:, :2] *= 40.0  # a few features dominate its scores
    targets = resolve_targets(encoder, r"layers\.\d\.(up|down)\.weight")
    ratios = outlier_ratios(encoder, batches, targets, progress=False)
    assert max(ratios, key=ratios.__getitem__) == "layers.1"
    levels = recipe_sparsity(Recipe(allocation="owl", sparsity=0.5, targets=r"(up|down)"),
                             encoder, targets, batches, progress=False)
    assert levels["layers.1.up.weight"] == min(levels.values()) < 0.5
