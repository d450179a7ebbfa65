"""Conformance matrix: every registry entry runs through the same shared checks.

- every registered criterion (:func:`secateurs.criteria.available_criteria`),
- every schedule class of :mod:`secateurs.schedules`,
- every slicer of the channel-slicing registry (``secateurs.graph.slicing.SLICERS``).

Each table below names how to build an entry and the inputs its declared capabilities
need; a registry entry missing from its table fails a test, so a new entry must be added.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import nn

import secateurs as sc
from secateurs import calibration, schedules
from secateurs.criteria import (
    BNScale,
    Clipping,
    Contribution,
    Criterion,
    DataCriterion,
    GroupCriterion,
    GroupL1,
    GroupL2,
    Magnitude,
    Random,
    Taylor,
    available_criteria,
    get_criterion,
)
from secateurs.selection import Threshold
from secateurs.targets import Target, resolve_targets
from secateurs.validation import ArgumentTypeError

try:
    from secateurs.graph import discover
    from secateurs.graph.slicing import SLICERS, Cut
except ImportError:  # the channel graph still lives in ``structured``
    from secateurs.structured.groups import discover  # type: ignore[no-redef]
    from secateurs.structured.slicing import SLICERS, Cut  # type: ignore[no-redef]

SPARSITIES = (0.0, 0.3, 0.7)


# == models and data =========================================================================

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 4))


class BNNet(nn.Module):
    """Conv -> BN -> ReLU twice, then a linear head: channel groups through BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    model = BNNet()
    with torch.no_grad():  # distinct BatchNorm scales, so bn_scale has something to rank
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    return model


#: The targets of the channel-group checks: both convolutions (their channels pass through
#: BatchNorm; the head's channels are model outputs and stay).
GROUP_TARGETS = ["features.0", "features.3"]


def _batches(model: nn.Module, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (6, 3, 6, 6) if isinstance(model, BNNet) else (6, 12)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """A calibration loss: any differentiable scalar of the outputs."""
    return model(batch).square().mean()


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    """One training-mode forward, backward and optimizer step."""
    model.train()
    opt.zero_grad()
    loss_of(model, batch).backward()
    opt.step()


def _state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


# == a. criteria =============================================================================

@dataclass(frozen=True)
class CriterionCase:
    """How to build one registered criterion and what its capabilities need.

    Attributes:
        cls: The registered class.
        options: Valid options by name (``get_criterion(name, **options)``), as the checks
            build it: everything its capabilities need (e.g. Taylor's calibration loss).
        data: Scores need statistics: a calibration pass (its ``request``, then ``fit``) or,
            under a Pruner, a training forward and backward first.
        groups: Scores whole channel groups (a GroupCriterion): checked with
            ``granularity="channel"`` and example inputs on a BatchNorm model.
        elements: Also scores single elements (``score(target)``).
        regrows: Pruned weights may come back by design.
        out_of_range: Options whose value is out of range: ``ValueError`` naming the option.
        wrong_type: Options of the wrong type: ``TypeError`` naming the option.
    """

    cls: type[Criterion]
    options: dict[str, Any] = field(default_factory=dict)
    data: bool = False
    groups: bool = False
    elements: bool = True
    regrows: bool = False
    out_of_range: tuple[dict[str, Any], ...] = ()
    wrong_type: tuple[dict[str, Any], ...] = ()

    def build(self) -> Criterion:
        return self.cls(**self.options)


CRITERIA: dict[str, CriterionCase] = {
    "magnitude": CriterionCase(Magnitude),
    "random": CriterionCase(Random, {"seed": 3}, wrong_type=({"seed": "x"}, {"seed": 1.5})),
    # By name, clipping derives its threshold from the sparsity (selection by count); its
    # threshold form is checked in test_threshold_criterion_*.
    "clipping": CriterionCase(Clipping, {"margin": 0.2}, regrows=True,
                              out_of_range=({"margin": -1}, {"threshold": -0.1},
                                            {"margin": math.nan}),
                              wrong_type=({"margin": "x"}, {"threshold": "x"})),
    "contribution": CriterionCase(Contribution, {"p": 1.0}, data=True,
                                  out_of_range=({"p": 0.5}, {"p": math.inf}, {"decay": 1.0},
                                                {"every": 0}),
                                  wrong_type=({"p": "2"}, {"every": 1.5})),
    "taylor": CriterionCase(Taylor, {"loss": loss_of}, data=True,
                            out_of_range=({"decay": -0.1}, {"every": 0}),
                            wrong_type=({"loss": 3},)),
    "l1": CriterionCase(GroupL1, groups=True),
    "l2": CriterionCase(GroupL2, groups=True),
    "bn_scale": CriterionCase(BNScale, groups=True, elements=False),
}
ELEMENT_CRITERIA = sorted(n for n, c in CRITERIA.items() if c.elements)
GROUP_CRITERIA = sorted(n for n, c in CRITERIA.items() if c.groups)


def _registered_builtins() -> set[str]:
    """Registered names whose class belongs to secateurs (a criterion a test registers in
    another file is not part of the library)."""
    return {n for n in available_criteria()
            if type(get_criterion(n)).__module__.startswith("secateurs.")}


def test_the_criterion_table_covers_every_registered_criterion() -> None:
    registered = _registered_builtins()
    assert registered == set(CRITERIA), (
        f"registered but not in CRITERIA: {sorted(registered - set(CRITERIA))}; in CRITERIA "
        f"but not registered: {sorted(set(CRITERIA) - registered)}")


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_builds_by_name_and_declares_its_capabilities(name: str) -> None:
    case = CRITERIA[name]
    for crit in (get_criterion(name), get_criterion(name, **case.options)):
        assert type(crit) is case.cls and crit.name == name
        assert crit.regrows is case.regrows
        assert isinstance(crit, DataCriterion) is case.data
        assert isinstance(crit, GroupCriterion) is case.groups
        assert crit.policy is None  # by count, from the pruner's sparsity
    built = case.build()
    request = built.request
    assert (request is not None) is case.data
    if case.data:
        assert isinstance(request, calibration.Request) and request.passes >= 1


def _element_model() -> tuple[nn.Module, list[Target]]:
    model = _mlp()
    return model, resolve_targets(model)


def _fit(crit: Criterion, model: nn.Module, targets: list[Target]) -> None:
    """Give a data criterion its statistics through its declared request."""
    request = crit.request
    if request is not None:
        observed = calibration.observe(model, _batches(model), targets, request,
                                       progress=False)
        crit.fit(targets, observed)


def _prunable_groups(model: nn.Module, x: torch.Tensor) -> list[Any]:
    structure = discover(model, x)
    groups = [g for g in structure.groups
              if any(g.produces(f"{t}.weight") for t in GROUP_TARGETS)]
    assert len(groups) == len(GROUP_TARGETS) and all(g.prunable for g in groups)
    return groups


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_scores_are_shaped_like_their_targets_finite_and_side_effect_free(name: str) -> None:
    case = CRITERIA[name]
    model, targets = _element_model()
    crit = case.build()
    if case.data:
        with pytest.raises(ValueError, match="statistics"):  # says what it needs first
            crit.score(targets[0])
    _fit(crit, model, targets)
    before = _state_bytes(model)
    for t in targets:
        if not case.elements:
            with pytest.raises(TypeError, match="channel"):
                crit.score(t)
            continue
        s = crit.score(t)
        assert s.shape == t.param.shape and s.dtype.is_floating_point, t.name
        assert torch.isfinite(s).all(), t.name
    if case.groups:
        assert isinstance(crit, GroupCriterion)
        net = _bn_net()
        for g in _prunable_groups(net, _batches(net)[0]):
            s = crit.score_group(g, net)
            assert s.shape == (g.units,) and torch.isfinite(s).all(), g.name
            assert s.dtype.is_floating_point
    assert _state_bytes(model) == before


def _check_realised(masks: dict[str, torch.Tensor], model: nn.Module,
                    dense: dict[str, torch.Tensor] | None,
                    sparsity: float, per_row: bool) -> None:
    """Sparsity within one element per selection group; pruned weights zero, kept ones as
    they were."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        groups = mask.shape[0] if per_row else 1
        zeros = int((~mask).sum())
        assert abs(zeros - sparsity * mask.numel()) <= groups, (name, zeros, mask.numel())
        w = params[name].detach()
        assert torch.all(w[~mask] == 0), name
        if dense is not None:
            assert torch.equal(w[mask], dense[name][mask]), name


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("name", ELEMENT_CRITERIA)
def test_one_shot_selection_reaches_the_target(name: str, sparsity: float) -> None:
    case = CRITERIA[name]
    model, _ = _element_model()
    dense = {k: v.detach().clone() for k, v in model.named_parameters()}
    report = sc.prune_(model, sparsity, case.build(),
                       calibration=_batches(model) if case.data else None, scope="row",
                       progress=False)
    assert set(report.masks) == {t.name for t in resolve_targets(model)}
    _check_realised(report.masks, model, dense, sparsity, per_row=True)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("name", ELEMENT_CRITERIA)
def test_pruner_selection_reaches_the_target_and_holds(name: str, sparsity: float) -> None:
    case = CRITERIA[name]
    model, _ = _element_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = _batches(model)
    with sc.Pruner(model, sparsity, case.build(), scope="layer", optimizer=opt) as pruner:
        for batch in batches:  # data criteria observe the training passes
            _train_step(model, opt, batch)
            pruner.step()
            _check_realised(dict(pruner.masks), model, None, sparsity, per_row=False)
        assert pruner.sparsity() == pytest.approx(sparsity, abs=1.0 / 64)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("name", GROUP_CRITERIA)
def test_group_selection_one_shot_and_under_a_pruner(name: str, sparsity: float) -> None:
    case = CRITERIA[name]
    # Under a Pruner: the units each channel group switches off.
    model = _bn_net()
    x = _batches(model)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with sc.Pruner(model, sparsity, case.build(), granularity="channel", scope="layer",
                   targets=GROUP_TARGETS, example_inputs=x, optimizer=opt) as pruner:
        _train_step(model, opt, x)
        pruner.step()
        groups = pruner.channel_groups
        assert len(groups) == len(GROUP_TARGETS)
        for g in groups:
            off = int(g.off(dict(pruner.masks)).sum())
            assert abs(off - sparsity * g.units) <= 1, (g.name, off, g.units)
    # One shot, compacted: the units kept in each group.
    model = _bn_net().eval()
    result = sc.prune_channels_(model, x, sparsity, case.build(), targets=GROUP_TARGETS)
    assert len(result.units) == len(GROUP_TARGETS)
    for group, (units, kept) in result.units.items():
        assert abs((units - kept) - sparsity * units) <= 1, (group, units, kept)
    assert result.after.params <= result.before.params
    assert model(x).shape == (x.shape[0], 4)


def _trained(case: CriterionCase) -> tuple[Criterion, list[Target], nn.Module]:
    """A criterion with state: bound to a Pruner for a few training steps."""
    model, _ = _element_model()
    crit = case.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with sc.Pruner(model, 0.3, crit, scope="layer", optimizer=opt) as pruner:
        for batch in _batches(model):
            _train_step(model, opt, batch)
            pruner.step()
    return crit, pruner.targets, model


@pytest.mark.parametrize("name", ELEMENT_CRITERIA)
def test_state_round_trip_scores_identically(name: str) -> None:
    case = CRITERIA[name]
    crit, targets, _ = _trained(case)
    state = copy.deepcopy(crit.state_dict())
    assert isinstance(state, dict)
    fresh = case.build()
    fresh.load_state_dict(state)
    for t in targets:
        assert torch.equal(fresh.score(t), crit.score(t)), t.name
    if case.data:  # state saved with other options is refused
        other = get_criterion(name, **{**case.options, "decay": 0.5})
        with pytest.raises(ValueError, match="options"):
            other.load_state_dict(copy.deepcopy(crit.state_dict()))


@pytest.mark.parametrize("name", GROUP_CRITERIA)
def test_group_state_round_trip_scores_identically(name: str) -> None:
    case = CRITERIA[name]
    crit = case.build()
    fresh = case.build()
    fresh.load_state_dict(copy.deepcopy(crit.state_dict()))
    net = _bn_net()
    assert isinstance(crit, GroupCriterion) and isinstance(fresh, GroupCriterion)
    for g in _prunable_groups(net, _batches(net)[0]):
        assert torch.equal(fresh.score_group(g, net), crit.score_group(g, net))


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_bad_options_are_refused_naming_them(name: str) -> None:
    case = CRITERIA[name]
    with pytest.raises(TypeError):
        get_criterion(name, no_such_option=1)
    for options in case.out_of_range:
        (key,) = options
        with pytest.raises(ValueError, match=key) as info:
            get_criterion(name, **{**case.options, **options})
        assert not isinstance(info.value, TypeError), info.value  # a value, not a type
    for options in case.wrong_type:
        (key,) = options
        with pytest.raises(TypeError, match=key):
            get_criterion(name, **{**case.options, **options})


# -- the threshold form of dynamic weight clipping ---------------------------------------------

THRESHOLDS = (0.0, 0.05, 0.2)


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_threshold_criterion_masks_match_the_threshold_under_a_pruner(threshold: float
                                                                       ) -> None:
    crit = Clipping(threshold=threshold, margin=0.1)
    assert isinstance(crit.policy, Threshold)
    model = _mlp()
    dense = {k: v.detach().clone() for k, v in model.named_parameters()}
    with sc.Pruner(model, None, crit) as pruner:
        pruner.step()
        for t in pruner.targets:
            assert torch.equal(pruner.masks[t.name], dense[t.name].abs() >= threshold), t.name
            w = t.param.detach()
            mask = pruner.masks[t.name]
            assert torch.all(w[~mask] == 0) and torch.equal(w[mask], dense[t.name][mask])


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_threshold_criterion_one_shot_selects_by_its_threshold(threshold: float) -> None:
    model = _mlp()
    dense = {k: v.detach().clone() for k, v in model.named_parameters()}
    report = sc.prune_(model, None, Clipping(threshold=threshold), progress=False)
    for name, mask in report.masks.items():
        assert torch.equal(mask, dense[name].abs() >= threshold), name
    # A sparsity as well would be ignored: it is refused, as the Pruner refuses it.
    with pytest.raises(ValueError, match="threshold"):
        sc.prune_(_mlp(), 0.5, Clipping(threshold=threshold), progress=False)


# == b. schedules ============================================================================

@dataclass(frozen=True)
class ScheduleCase:
    """Constructor arguments of one schedule class, and bad arguments with the name the
    error must carry (``ArgumentTypeError`` for a wrong type, ``ValueError`` otherwise)."""

    variants: tuple[dict[str, Any], ...]
    wrong_type: tuple[tuple[dict[str, Any], str], ...] = ()
    out_of_range: tuple[tuple[dict[str, Any], str], ...] = ()


_RAMP = {"initial": 0.1, "final": 0.8, "begin_step": 2, "end_step": 12}
_INNER = schedules.Linear(0.2, 0.6, end_step=5)

SCHEDULES: dict[str, ScheduleCase] = {
    "Constant": ScheduleCase(
        ({"value": 0.5}, {"value": 0}),
        wrong_type=(({"value": "0.5"}, "value"), ({"value": True}, "value")),
        out_of_range=(({"value": math.nan}, "value"), ({"value": math.inf}, "value"))),
    "Linear": ScheduleCase(
        (_RAMP, {"initial": 0.9, "final": 0.0, "end_step": 3}),
        wrong_type=(({**_RAMP, "initial": "0"}, "initial"), ({**_RAMP, "end_step": 3.5},
                                                           "end_step")),
        out_of_range=(({**_RAMP, "end_step": 2}, "end_step"),
                      ({**_RAMP, "begin_step": -1}, "begin_step"),
                      ({**_RAMP, "final": math.nan}, "final"))),
    "Cosine": ScheduleCase(
        (_RAMP, {"initial": 1.0, "end_step": 7}),
        wrong_type=(({**_RAMP, "final": None}, "final"),),
        out_of_range=(({**_RAMP, "end_step": 1}, "end_step"),)),
    "Polynomial": ScheduleCase(
        ({**_RAMP, "power": 2.0, "frequency": 3}, {**_RAMP, "power": 0.5}),
        wrong_type=(({**_RAMP, "frequency": 1.5}, "frequency"),),
        out_of_range=(({**_RAMP, "power": 0}, "power"), ({**_RAMP, "frequency": 0},
                                                         "frequency"))),
    "Cubic": ScheduleCase(
        (_RAMP, {**_RAMP, "frequency": 4}),
        wrong_type=(({**_RAMP, "begin_step": "2"}, "begin_step"),),
        out_of_range=(({**_RAMP, "frequency": -1}, "frequency"),)),
    "Exponential": ScheduleCase(
        ({"initial": 0.1, "decay_rate": 0.5, "decay_steps": 3},
         {"initial": 0.1, "decay_rate": 0.9, "staircase": True, "begin_step": 2},
         {"initial": 1e-3, "decay_rate": 1.5}),
        wrong_type=(({"initial": 0.1, "decay_rate": 0.5, "staircase": 1}, "staircase"),
                    ({"initial": 0.1, "decay_rate": "0.5"}, "decay_rate")),
        out_of_range=(({"initial": 0.1, "decay_rate": 0.0}, "decay_rate"),
                      ({"initial": 0.1, "decay_rate": 0.5, "decay_steps": 0}, "decay_steps"))),
    "Step": ScheduleCase(
        ({"initial": 0.1, "gamma": 0.5, "step_size": 3},
         {"initial": 0.1, "gamma": 0.1, "milestones": [2, 5, 9]}),
        wrong_type=(({"initial": 0.1, "gamma": 0.5, "step_size": 2.0}, "step_size"),),
        out_of_range=(({"initial": 0.1, "gamma": 0.5}, "step_size"),
                      ({"initial": 0.1, "gamma": 0.5, "milestones": [3, 2]}, "milestones"),
                      ({"initial": 0.1, "gamma": -1, "step_size": 2}, "gamma"))),
    "Warmup": ScheduleCase(
        ({"schedule": _INNER, "warmup_steps": 4}, {"schedule": _INNER, "warmup_steps": 0,
                                                   "initial": 0.1}),
        wrong_type=(({"schedule": 0.5, "warmup_steps": 4}, "schedule"),),
        out_of_range=(({"schedule": _INNER, "warmup_steps": -1}, "warmup_steps"),)),
    "Join": ScheduleCase(
        ({"schedules": [_INNER, schedules.Constant(0.6)], "boundaries": [6]},
         {"schedules": [_INNER]}),
        wrong_type=(({"schedules": [_INNER, 0.6], "boundaries": [6]}, "schedules"),),
        out_of_range=(({"schedules": [], "boundaries": []}, "schedules"),
                      ({"schedules": [_INNER, _INNER], "boundaries": [3, 6]}, "boundaries"))),
}
STEPS = 40


def _schedule_classes() -> dict[str, type[schedules.Schedule]]:
    """The concrete Schedule subclasses reachable from the module (defined or imported)."""
    return {name: obj for name, obj in vars(schedules).items()
            if inspect.isclass(obj) and issubclass(obj, schedules.Schedule)
            and not inspect.isabstract(obj) and not name.startswith("_")}


def _schedules() -> list[tuple[str, dict[str, Any]]]:
    return [(name, kwargs) for name, case in SCHEDULES.items() for kwargs in case.variants]


def test_the_schedule_table_covers_every_schedule_class() -> None:
    found = set(_schedule_classes())
    assert found == set(SCHEDULES), (
        f"schedule classes not in SCHEDULES: {sorted(found - set(SCHEDULES))}; in SCHEDULES "
        f"but not in secateurs.schedules: {sorted(set(SCHEDULES) - found)}")


@pytest.mark.parametrize(("name", "kwargs"), _schedules())
def test_schedules_are_pure_bounded_and_state_free(name: str, kwargs: dict[str, Any]) -> None:
    cls = getattr(schedules, name)
    s = cls(**kwargs)
    before = copy.deepcopy(s)
    ascending = [s(t) for t in range(STEPS + 1)]
    again = [s(t) for t in reversed(range(STEPS + 1))][::-1]
    assert ascending == again  # pure: the same value for the same step, in any order
    assert [cls(**kwargs)(t) for t in range(STEPS + 1)] == ascending
    assert all(isinstance(v, float) and math.isfinite(v) for v in ascending)
    low, high = s.bounds()
    assert all(low <= v <= high for v in ascending), (s.bounds(), ascending)
    assert s == before and vars(s) == vars(before)  # calling changed nothing
    with pytest.raises(AttributeError):  # and nothing can: a frozen value
        setattr(s, next(iter(kwargs)), 0)


@pytest.mark.parametrize(("name", "kwargs"), _schedules())
def test_schedule_repr_round_trips(name: str, kwargs: dict[str, Any]) -> None:
    s = getattr(schedules, name)(**kwargs)
    text = repr(s)
    assert text.startswith(f"{name}("), text
    try:
        rebuilt = eval(text, {**vars(schedules), "inf": math.inf, "nan": math.nan})
    except (SyntaxError, NameError, TypeError):
        return  # a repr that does not evaluate must still name the class (above)
    assert rebuilt == s and [rebuilt(t) for t in range(STEPS)] == [s(t) for t in range(STEPS)]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_bad_schedule_arguments_are_refused_naming_them(name: str) -> None:
    cls = getattr(schedules, name)
    case = SCHEDULES[name]
    for kwargs, argument in case.wrong_type:
        with pytest.raises(ArgumentTypeError, match=argument):
            cls(**kwargs)
    for kwargs, argument in case.out_of_range:
        with pytest.raises(ValueError, match=argument):
            cls(**kwargs)
    s = cls(**case.variants[0])
    with pytest.raises(ValueError, match="step"):
        s(-1)
    with pytest.raises(TypeError, match="step"):
        s(1.5)


# == c. slicers ==============================================================================

F = tp.pruner.function


@dataclass(frozen=True)
class SlicerCase:
    """A real layer for one handler type, the positions removed from its out- and
    in-channels (``None``: that side is not checked), and whether the slicer refuses it."""

    build: Callable[[], nn.Module]
    out: list[int] | None
    inp: list[int] | None
    refused: bool = False


SLICER_CASES: dict[type, list[SlicerCase]] = {
    F.ConvPruner: [
        SlicerCase(lambda: nn.Conv2d(4, 6, 3), [0, 5], [1, 2]),
        SlicerCase(lambda: nn.Conv1d(4, 6, 3, bias=False), [3], [0]),
        SlicerCase(lambda: nn.ConvTranspose2d(4, 6, 3), [1, 4], [3]),
        # A grouped convolution: the same position of every group goes at once.
        SlicerCase(lambda: nn.Conv2d(8, 6, 3, groups=2), [1, 4], [1, 5]),
        SlicerCase(lambda: nn.ConvTranspose2d(4, 4, 3, groups=2), [1, 3], None, refused=True),
        SlicerCase(lambda: nn.Conv2d(4, 8, 3, groups=4), None, [1], refused=True),
    ],
    F.DepthwiseConvPruner: [SlicerCase(lambda: nn.Conv2d(6, 6, 3, groups=6), [0, 3], [0, 3])],
    F.LinearPruner: [SlicerCase(lambda: nn.Linear(5, 6), [0, 2, 5], [4]),
                     SlicerCase(lambda: nn.Linear(5, 6, bias=False), [1], [0, 1])],
    F.BatchnormPruner: [SlicerCase(lambda: nn.BatchNorm2d(6), [2, 3], [2, 3]),
                        SlicerCase(lambda: nn.BatchNorm1d(6, affine=False), [1], [1])],
    F.InstanceNormPruner: [SlicerCase(lambda: nn.InstanceNorm2d(6, affine=True), [0], [0]),
                           SlicerCase(lambda: nn.InstanceNorm1d(6), [4], [4])],
    F.PReLUPruner: [SlicerCase(lambda: nn.PReLU(6), [1, 2], [1, 2]),
                    SlicerCase(lambda: nn.PReLU(), [0], [0])],
    F.EmbeddingPruner: [SlicerCase(lambda: nn.Embedding(10, 6), [0, 5], [0, 5])],
}


def test_the_slicer_table_covers_every_registered_slicer() -> None:
    registered, listed = set(SLICERS), set(SLICER_CASES)
    assert registered == listed, (
        f"slicers not in SLICER_CASES: {sorted(t.__name__ for t in registered - listed)}; "
        f"in SLICER_CASES but not registered: {sorted(t.__name__ for t in listed - registered)}")


def _slicer_cases() -> list[Any]:
    return [pytest.param(handler, case, out, id=f"{handler.__name__}-{i}-{side}")
            for handler, cases in SLICER_CASES.items() for i, case in enumerate(cases)
            for out, side in ((True, "out"), (False, "in"))
            if (case.out if out else case.inp) is not None]


@pytest.mark.parametrize(("handler", "case", "out"), _slicer_cases())
def test_slices_index_the_parameters_the_handler_removes(handler: type, case: SlicerCase,
                                                          out: bool) -> None:
    layer = case.build()
    positions = case.out if out else case.inp
    assert positions is not None
    index = torch.tensor(positions, dtype=torch.long)
    slicer = SLICERS[handler]
    if case.refused:
        with pytest.raises(ValueError):
            slicer(layer, out, index)
        return
    cuts: list[Cut] = slicer(layer, out, index)
    params = dict(layer.named_parameters(recurse=False))
    predicted = {n: list(p.shape) for n, p in params.items()}
    for cut in cuts:
        assert cut.param_name in params, (cut, sorted(params))
        p = params[cut.param_name]
        assert 0 <= cut.dim < p.dim(), cut
        assert cut.index.shape == index.shape, cut  # one position per handler index
        assert int(cut.index.min()) >= 0 and int(cut.index.max()) < p.shape[cut.dim], cut
        if cut.tie is not None:
            assert cut.tie.shape == index.shape
        predicted[cut.param_name][cut.dim] -= int(cut.index.unique().numel())
    # Torch-Pruning's own handler, on a copy, removes exactly those slices.
    pruned = copy.deepcopy(layer)
    fn = handler()
    (fn.prune_out_channels if out else fn.prune_in_channels)(pruned, positions)
    got = {n: list(p.shape) for n, p in pruned.named_parameters(recurse=False)}
    assert got == predicted, (cuts, got, predicted)
