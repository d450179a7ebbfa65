"""Bad input to the public API: only the documented exceptions (``ValueError``,
``TypeError``), a message that names the offending value, and the model unchanged."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs as sc
from secateurs import checkpoint
from secateurs.export import load_pruned, save_pruned, sparsify_
from secateurs.oneshot import prune_
from secateurs.schedules import Cubic, Exponential, Linear

_fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(),
                         nn.Linear(8, 4))


def _bytes(model: nn.Module) -> dict[str, bytes]:
    """Exact bytes of every tensor of the state (NaN-safe equality)."""
    return {k: v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


def _refused(call: Callable[[], Any], model: nn.Module, *named: str,
             errors: tuple[type[Exception], ...] = (ValueError, TypeError)) -> str:
    """``call`` raises one of ``errors`` whose message holds one of ``named``; the model's
    state is unchanged. Returns the message."""
    before = _bytes(model)
    with pytest.raises(errors) as info:
        call()
    message = str(info.value)
    assert not named or any(n in message for n in named), message
    assert _bytes(model) == before
    return message


def _shown(x: float) -> tuple[str, ...]:
    return (repr(x), f"{x:g}", str(x))


# -- sparsity, schedules, update_every ---------------------------------------------------

@given(st.one_of(st.floats(max_value=0.0, exclude_max=True), st.floats(min_value=1.0),
                 st.just(math.nan)))
def test_sparsity_outside_zero_one_is_refused(s: float) -> None:
    model = _model()
    _refused(lambda: sc.Pruner(model, s), model, *_shown(s))
    _refused(lambda: prune_(model, s, "magnitude", progress=False), model, *_shown(s))


@given(st.one_of(st.text(max_size=5), st.lists(st.floats(0, 0.9), max_size=2), st.booleans(),
                 st.just(torch.tensor(0.5))))
def test_sparsity_of_the_wrong_type_is_refused(s: object) -> None:
    model = _model()
    _refused(lambda: sc.Pruner(model, s), model, type(s).__name__)  # type: ignore[arg-type]


@given(initial=st.floats(-2, 2), final=st.floats(-2, 2), begin=st.integers(0, 20),
       length=st.integers(1, 50))
def test_schedules_leaving_zero_one_are_refused_before_any_step(initial: float, final: float,
                                                                begin: int, length: int
                                                                ) -> None:
    assume(not (min(initial, final) >= 0 and max(initial, final) < 1))
    model = _model()
    for schedule in (Linear(initial, final, begin_step=begin, end_step=begin + length),
                     Cubic(initial=initial, final=final, begin_step=begin,
                           end_step=begin + length)):
        _refused(lambda s=schedule: sc.Pruner(model, s), model, f"{min(initial, final):g}",
                 f"{max(initial, final):g}")


@given(st.one_of(st.floats(allow_nan=True), st.integers(-5, 5), st.booleans()),
       st.one_of(st.floats(0.1, 2), st.floats(-2, 0), st.just(math.nan)), st.integers(0, 3))
def test_schedule_arguments_refused_with_their_name(initial: Any, rate: float, steps: int
                                                    ) -> None:
    bad = [name for name, is_bad in (
        ("initial", isinstance(initial, bool) or not math.isfinite(initial)),
        ("decay_rate", not rate > 0),
        ("decay_steps", steps < 1),
    ) if is_bad]
    if not bad:
        schedule = Exponential(initial, rate, decay_steps=steps)
        assert schedule(0) == initial and schedule.decay_rate == rate
        return
    # The message names one of the bad arguments (whichever is checked first).
    with pytest.raises((ValueError, TypeError), match="|".join(bad)):
        Exponential(initial, rate, decay_steps=steps)


@given(st.one_of(st.integers(max_value=0), st.floats(0.5, 3), st.booleans(), st.text(max_size=2)))
def test_update_every_refused(every: object) -> None:
    model = _model()
    _refused(lambda: sc.Pruner(model, 0.5, update_every=every), model,  # type: ignore[arg-type]
             repr(every))


# -- granularity, scope, criterion -----------------------------------------------------------

@given(st.integers(0, 12), st.integers(0, 12))
def test_nm_strings(n: int, m: int) -> None:
    model = _model()
    spec = f"{n}:{m}"
    if 1 <= n < m and all(k % m == 0 for k in (16, 32, 8)):
        assert sc.Pruner(model, granularity=spec).granularity.m == m
        return
    _refused(lambda: sc.Pruner(model, granularity=spec), model, repr(spec), f"M={m}")


@given(st.text(max_size=8).filter(lambda s: s not in ("element", "channel")
                                  and not re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", s)))
def test_unknown_granularity_scope_criterion_refused(word: str) -> None:
    model = _model()
    _refused(lambda: sc.Pruner(model, 0.5, granularity=word), model, repr(word))
    if word not in ("row", "layer", "global"):
        _refused(lambda: sc.Pruner(model, 0.5, scope=word), model, repr(word))
    if word not in sc.available_criteria():
        _refused(lambda: sc.Pruner(model, 0.5, criterion=word), model, repr(word))


# -- targets -------------------------------------------------------------------------------

@given(st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3))
def test_target_names_that_do_not_exist_are_refused(names: list[str]) -> None:
    model = _model()
    valid = {"0", "2", "4", "0.weight", "2.weight", "4.weight"}
    assume(any(n not in valid for n in names))
    bad = next(n for n in names if n not in valid)
    _refused(lambda: sc.Pruner(model, 0.5, targets=names), model, repr(bad))


@given(st.one_of(st.integers(), st.floats(), st.lists(st.integers(), min_size=1, max_size=2)))
def test_targets_of_the_wrong_type_are_refused(spec: object) -> None:
    model = _model()
    _refused(lambda: sc.Pruner(model, 0.5, targets=spec), model,  # type: ignore[arg-type]
             type(spec).__name__, repr(spec), repr(spec[0]) if isinstance(spec, list) else "~")


def test_invalid_regular_expression_is_a_value_error() -> None:
    model = _model()
    _refused(lambda: sc.Pruner(model, 0.5, targets="(["), model, "'(['")


def test_optimizer_of_the_wrong_type_is_refused_at_construction() -> None:
    model = _model()
    _refused(lambda: sc.Pruner(model, 0.5, optimizer="sgd"), model,  # type: ignore[arg-type]
             "str")


# -- calibration batches -------------------------------------------------------------------

@given(features=st.integers(1, 40).filter(lambda f: f != 16), rows=st.integers(1, 6))
def test_calibration_batches_of_the_wrong_shape_are_refused(features: int, rows: int) -> None:
    model = _model()
    batch = torch.randn(rows, features)
    _refused(lambda: prune_(model, 0.5, "contribution", calibration=[batch],
                               progress=False), model, f"({rows}, {features})")


@given(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.float64, torch.uint8]))
def test_calibration_batches_of_the_wrong_dtype_are_refused(dtype: torch.dtype) -> None:
    model = _model()
    batch = torch.ones(4, 16, dtype=dtype)
    _refused(lambda: prune_(model, 0.5, "contribution", calibration=[torch.randn(4, 16),
                                                                         batch],
                               progress=False), model, "batch 1")


@given(st.sampled_from([[], (), iter([])]))
def test_empty_calibration_is_refused(batches: Any) -> None:
    model = _model()
    _refused(lambda: prune_(model, 0.5, "contribution", calibration=batches,
                               progress=False), model, "no batches")


@given(st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_calibration_inputs_are_refused(value: float) -> None:
    model = _model()
    batch = torch.randn(4, 16)
    batch[1, 3] = value
    _refused(lambda: prune_(model, 0.5, "contribution", calibration=[batch],
                               progress=False), model, "NaN or Inf")


# -- NaN / Inf weights, empty models ----------------------------------------------------------

@given(layer=st.sampled_from([0, 2, 4]), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       where=st.integers(0, 10_000), criterion=st.sampled_from(["magnitude", "random"]))
def test_non_finite_weights_are_refused_before_masking(layer: int, value: float, where: int,
                                                       criterion: str) -> None:
    model = _model()
    weight = model[layer].weight
    with torch.no_grad():
        weight.view(-1)[where % weight.numel()] = value
    name = f"'{layer}.weight'"
    _refused(lambda: sc.Pruner(model, 0.5, criterion).step(), model, name)
    _refused(lambda: prune_(model, 0.5, criterion, progress=False), model, name)


@pytest.mark.parametrize("model", [nn.Sequential(), nn.Sequential(nn.ReLU(), nn.Dropout()),
                                   nn.Sequential(nn.LayerNorm(4))], ids=["empty", "no-params",
                                                                          "only-1d"])
def test_models_without_targets_are_refused(model: nn.Module, tmp_path: Path) -> None:
    _refused(lambda: sc.Pruner(model, 0.5), model, "matched no parameter")
    _refused(lambda: prune_(model, 0.5, "magnitude", progress=False), model,
             "matched no parameter")
    _refused(lambda: sparsify_(model), model, "matched no parameter")
    _refused(lambda: save_pruned(tmp_path / "m.safetensors", model), model,
             "matched no parameter")
    assert not (tmp_path / "m.safetensors").exists()
    checkpoint.save(tmp_path / "e.safetensors", model)  # nothing to prune is still savable
    checkpoint.load(tmp_path / "e.safetensors", model)


# -- files ---------------------------------------------------------------------------------

@_fixture_ok
@given(st.binary(max_size=300), st.sampled_from(["checkpoint", "pruned"]))
def test_any_bytes_as_a_file_are_refused_cleanly(tmp_path: Path, data: bytes, kind: str
                                                 ) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(data)
    model = _model()
    load: Callable[[], Any] = (lambda: checkpoint.load(path, model)) if kind == "checkpoint" \
        else (lambda: load_pruned(path, model))
    _refused(load, model, "garbage.safetensors", errors=(checkpoint.CheckpointError,))


@_fixture_ok
@given(cut=st.floats(0, 0.999))
def test_truncated_checkpoints_are_refused(tmp_path: Path, cut: float) -> None:
    model = _model()
    pruner = sc.Pruner(model, 0.5)
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, model, pruner)
    data = path.read_bytes()
    path.write_bytes(data[: int(cut * len(data))])
    other = _model()
    with torch.no_grad():
        other[0].weight.mul_(2)
    _refused(lambda: checkpoint.load(path, other, sc.Pruner(other, 0.5)), other,
             "truncated", "not a safetensors", errors=(checkpoint.CheckpointError,))
