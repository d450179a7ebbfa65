from __future__ import annotations

import re

import pytest
from torch import nn

from secateurs.targets import resolve_targets


def names(model, spec):
    return [t.name for t in resolve_targets(model, spec)]


def test_default_is_every_linear_and_conv_weight(cnn):
    assert names(cnn, None) == ["features.0.weight", "features.2.weight", "head.1.weight",
                                "head.3.weight"]


def test_regex_string_and_compiled(cnn):
    assert names(cnn, r"^head\.") == ["head.1.weight", "head.3.weight"]
    assert names(cnn, re.compile(r"features\.2")) == ["features.2.weight"]


def test_names_accept_parameters_and_modules(cnn):
    assert names(cnn, ["head.3", "features.0.weight"]) == ["features.0.weight",
                                                            "head.3.weight"]


def test_callable_chooses_modules(cnn):
    assert names(cnn, lambda name, m: isinstance(m, nn.Conv2d)) == [
        "features.0.weight", "features.2.weight"]


def test_unknown_name_is_a_clear_error(cnn):
    with pytest.raises(ValueError, match="'head.9'.*valid names include"):
        resolve_targets(cnn, ["head.9"])


def test_matching_nothing_is_a_clear_error(cnn):
    with pytest.raises(ValueError, match="matched no parameter"):
        resolve_targets(cnn, r"^decoder")


def test_wrong_type_is_a_type_error(cnn):
    with pytest.raises(TypeError, match="targets must be"):
        resolve_targets(cnn, 3)  # type: ignore[arg-type]


def test_tied_weights_counted_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    assert names(model, r"weight") == ["0.weight"]
