"""Budget and Plateau on scripted metric sequences (exact decisions), rollback bit for bit,
and Budget on a real short run."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import train_steps
from secateurs import Pruner
from secateurs.controllers import (
    Budget,
    Decision,
    Plateau,
    PruneLR,
    ThresholdAdapter,
    read_metric,
)
from secateurs.lr import ScheduledLR
from secateurs.schedules import Constant, Cosine, Cubic, Linear
from secateurs.search import Recipe, Setting, finetune, train_dense
from secateurs.tasks import get_task
from secateurs.validation import ArgumentTypeError

A, P, W, R, RA, D, H, RE = ("advance", "pause", "wait", "rollback", "raise", "done", "hold",
                            "resume")

@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Small models train many times faster on one intra-op thread of a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)



def scripted(patience: int = 1, **options: object) -> tuple[Budget, Pruner]:
    """100 weights; the level is 0.1 per advancing step up to 0.8; budget 0.9 - 0.05."""
    torch.manual_seed(0)
    model = nn.Linear(10, 10, bias=False)
    budget = Budget(Linear(0.0, 0.8, end_step=8), baseline=0.9, tolerance=0.05,
                    patience=patience, resolution=0.05, **options)
    pruner = Pruner(model, budget.sparsity, update_every=1)
    budget.attach(pruner)
    return budget, pruner


def play(budget: Budget, pruner: Pruner, metrics: Sequence[float],
         steps: int = 2) -> list[str]:
    """``steps`` pruner steps before each observation; returns the decisions."""
    out = []
    for metric in metrics:
        for _ in range(steps):
            pruner.step()
        out.append(budget.observe({"accuracy": metric}).value)
    return out


def test_budget_advances_pauses_rolls_back_raises_and_ends_step_by_step() -> None:
    budget, pruner = scripted()
    assert play(budget, pruner, [0.9, 0.9]) == [A, A]
    assert budget.level(pruner.step_count) == pytest.approx(0.4)
    saved = copy.deepcopy(budget.saved)
    assert play(budget, pruner, [0.8]) == [P]          # outside: held at 0.6
    assert budget.level(pruner.step_count + 5) == pytest.approx(0.6)
    assert play(budget, pruner, [0.8]) == [R]          # patience 1 spent
    assert pruner.step_count == saved["step"] == 4     # back to the last good state
    assert budget.upper == pytest.approx(0.6)
    assert budget.ceiling == pytest.approx(0.5)        # 0.4 + 0.5 * (0.6 - 0.4)
    assert all(torch.equal(pruner.masks[n], saved["states"][1]["masks"][n])
               for n in pruner.masks)
    assert play(budget, pruner, [0.9]) == [RA]         # 0.5 met: try half-way to 0.6
    assert budget.ceiling == pytest.approx(0.55)
    assert play(budget, pruner, [0.9]) == [D]          # 0.6 - 0.55 <= resolution
    assert pruner.sparsity() == pytest.approx(0.55)
    assert play(budget, pruner, [0.8, 0.9]) == [H, H]
    assert [o.decision for o in budget.history] == [A, A, P, R, RA, D, H, H]


def test_budget_resumes_where_it_paused() -> None:
    budget, pruner = scripted(patience=2)
    assert play(budget, pruner, [0.9, 0.8, 0.8, 0.86]) == [A, P, W, RE]
    # Held at progress 4 for two evaluations; advancing resumes from there.
    assert budget.level(pruner.step_count) == pytest.approx(0.4)
    assert play(budget, pruner, [0.9]) == [A]
    assert budget.level(pruner.step_count) == pytest.approx(0.6)


def test_patience_zero_rolls_back_at_once_and_finish_restores_the_last_good_state() -> None:
    budget, pruner = scripted(patience=0)
    assert play(budget, pruner, [0.9, 0.9, 0.9, 0.5]) == [A, A, A, R]
    assert budget.ceiling == pytest.approx(0.7)        # 0.6 + 0.5 * (0.8 - 0.6)
    play(budget, pruner, [0.5, 0.5], steps=1)          # a second failure, then a third
    before = budget.saved
    pruner.step()
    outcome = budget.finish()
    assert pruner.step_count == before["step"]
    assert outcome.level == pytest.approx(before["level"])
    assert outcome.metric == 0.9 and outcome.rollbacks == budget.rollbacks
    assert "highest level that met it" in outcome.message


def test_finish_keeps_the_current_state_when_it_is_the_last_good_one() -> None:
    budget, pruner = scripted()
    play(budget, pruner, [0.9, 0.9])
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    outcome = budget.finish()
    assert pruner.step_count == 4 and outcome.sparsity == pruner.sparsity()
    assert all(torch.equal(masks[n], pruner.masks[n]) for n in masks)
    assert budget.phase == "done"


def test_no_evaluation_in_budget_restores_the_attached_state_and_says_so() -> None:
    budget, pruner = scripted(patience=0)
    play(budget, pruner, [0.1])
    outcome = budget.finish()
    assert pruner.sparsity() == 0.0 and math.isnan(outcome.metric)
    assert "no evaluation met the budget" in outcome.message


def test_limits_relative_and_lower_is_better() -> None:
    torch.manual_seed(0)
    rel = Budget(Constant(0.5), baseline=0.8, tolerance=0.1, relative=True)
    assert rel.limit == pytest.approx(0.72) and rel.within(0.72) and not rel.within(0.71)
    loss = Budget(Constant(0.5), baseline=0.3, tolerance=0.05, higher_is_better=False,
                  metric="loss")
    assert loss.limit == pytest.approx(0.35) and loss.within(0.2) and not loss.within(0.36)


@pytest.mark.parametrize(("options", "message"), [
    ({"tolerance": -0.1}, r"tolerance must be .*in \[0, inf\), got -0\.1"),
    ({"backoff": 1.0}, r"backoff must be .*in \(0, 1\), got 1\.0"),
    ({"backoff": 0.0}, r"backoff must be .*in \(0, 1\), got 0\.0"),
    ({"patience": -1}, "patience must be an integer >= 0, got -1"),
    ({"resolution": 0.0}, r"resolution must be .*in \(0, inf\), got 0\.0"),
    ({"baseline": math.nan}, "baseline must be a finite number"),
])
def test_bad_options_name_the_value(options: dict, message: str) -> None:
    kwargs = {"baseline": 0.9, "tolerance": 0.01, **options}
    with pytest.raises(ValueError, match=message):
        Budget(Linear(0.0, 0.5, end_step=4), **kwargs)


@pytest.mark.parametrize(("options", "message"), [
    ({"patience": "3"}, "patience must be an integer >= 0, got str '3'"),
    ({"patience": 2.0}, "patience must be an integer"),
    ({"tolerance": "0.1"}, "tolerance must be a finite number"),
    ({"relative": 1}, "relative must be True or False"),
    ({"metric": 3}, "metric must be a metric name"),
])
def test_options_of_the_wrong_type_are_type_errors(options: dict, message: str) -> None:
    kwargs = {"baseline": 0.9, "tolerance": 0.01, **options}
    with pytest.raises(ArgumentTypeError, match=message) as info:
        Budget(Linear(0.0, 0.5, end_step=4), **kwargs)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    with pytest.raises(ArgumentTypeError, match="schedule must be a secateurs Schedule"):
        Budget(0.5, baseline=0.9, tolerance=0.01)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="schedule must be a secateurs Schedule"):
        ThresholdAdapter(0.1, baseline=0.9, tolerance=0.01)  # type: ignore[arg-type]


def test_plateau_and_prune_lr_refuse_wrong_types_and_values(mlp: nn.Module) -> None:
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    with pytest.raises(ArgumentTypeError, match="patience must be an integer >= 0, got str"):
        Plateau(opt, patience="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"cooldown must be an integer >= 0, got -2"):
        Plateau(opt, cooldown=-2)
    with pytest.raises(ArgumentTypeError, match="threshold must be a finite number"):
        Plateau(opt, threshold=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold_mode must be one of 'rel', 'abs'"):
        Plateau(opt, threshold_mode="ratio")  # type: ignore[arg-type]
    pruner = Pruner(mlp, 0.5)
    lr = ScheduledLR(opt, Constant(1.0))
    with pytest.raises(ValueError, match="to_step must be an integer >= 0, got -1"):
        PruneLR(pruner, lr, to_step=-1)
    with pytest.raises(ArgumentTypeError, match="to_step must be an integer"):
        PruneLR(pruner, lr, to_step=1.5)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="plateau must be a secateurs.controllers.Plateau"):
        PruneLR(pruner, lr, plateau=opt)  # type: ignore[arg-type]


def test_a_schedule_reaching_one_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"stay in \[0, 1\)"):
        Budget(Linear(0.0, 1.0, end_step=4), baseline=0.9, tolerance=0.01)


def test_observe_needs_attach_and_the_metric() -> None:
    budget = Budget(Linear(0.0, 0.5, end_step=4), baseline=0.9, tolerance=0.01)
    with pytest.raises(RuntimeError, match="attach"):
        budget.observe(0.9)
    with pytest.raises(ValueError, match=r"lack 'accuracy'; got keys \['loss'\]"):
        read_metric({"loss": 0.1}, "accuracy")
    with pytest.raises(ValueError, match="NaN"):
        read_metric(math.nan, "accuracy")


def test_state_dict_round_trip_continues_identically() -> None:
    a, pa = scripted()
    play(a, pa, [0.9, 0.8])
    state, pruner_state = a.state_dict(), pa.state_dict()
    b, pb = scripted()
    pb.load_state_dict(pruner_state)
    b.load_state_dict(state)
    assert play(a, pa, [0.8, 0.9, 0.9]) == play(b, pb, [0.8, 0.9, 0.9])
    assert a.ceiling == b.ceiling and [o.decision for o in a.history] == \
        [o.decision for o in b.history]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=14), st.integers(0, 2))
def test_any_metric_sequence_ends_in_a_state_that_met_the_budget(
        within: list[bool], patience: int) -> None:
    budget, pruner = scripted(patience=patience)
    decisions = play(budget, pruner, [0.9 if w else 0.5 for w in within])
    outside = 0
    for decision, ok in zip(decisions, within, strict=True):
        outside = 0 if ok or decision in (H, R) else outside + 1
        assert outside <= patience  # a rollback comes after at most `patience` waits
        if decision == R:
            assert not ok
    outcome = budget.finish()
    assert math.isnan(outcome.metric) or budget.within(outcome.metric)
    assert pruner.sparsity() == pytest.approx(outcome.sparsity)
    assert all(o.level <= 0.8 + 1e-12 for o in budget.history)


def test_per_target_allocation_feeds_the_pruner() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    names = ["0.weight", "1.weight"]

    def allocation(overall: float) -> dict[str, float]:
        return {names[0]: overall / 2, names[1]: overall * 1.5}

    budget = Budget(Linear(0.0, 0.6, end_step=4), baseline=0.9, tolerance=0.05,
                    allocation=allocation)
    pruner = Pruner(model, budget.sparsity, update_every=1)
    budget.attach(pruner)
    for _ in range(5):
        pruner.step()
    assert pruner.sparsity(names[0]) == pytest.approx(0.3, abs=1 / 64)
    assert pruner.sparsity(names[1]) == pytest.approx(0.9, abs=1 / 64)


# -- rollback restores everything, bit for bit -----------------------------------------------


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_rollback_restores_weights_optimizer_pruner_and_scheduler_bit_for_bit(
        mlp: nn.Module) -> None:
    opt = torch.optim.SGD(mlp.parameters(), lr=0.05, momentum=0.9)
    lr = ScheduledLR(opt, Cosine(1.0, 0.1, end_step=40))
    budget = Budget(Cubic(0.0, 0.9, 0, 20, frequency=2), baseline=0.5, tolerance=0.1,
                    patience=1)
    pruner = Pruner(mlp, budget.sparsity, update_every=2, optimizer=opt)
    budget.attach(pruner, lr)

    def after() -> None:
        pruner.step()
        lr.step()

    train_steps(mlp, opt, 4, after)
    assert budget.observe(0.5) == Decision.ADVANCE
    saved = copy.deepcopy(budget.saved)
    train_steps(mlp, opt, 4, after, seed=1)
    budget.observe(0.1)
    train_steps(mlp, opt, 4, after, seed=2)
    assert budget.observe(0.1) == Decision.ROLLBACK
    now = [mlp.state_dict(), pruner.state_dict(), opt.state_dict(), lr.state_dict()]
    assert _equal(now, saved["states"])
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(lr.get_last_lr()[0])


# -- a real short run -------------------------------------------------------------------------


def test_budget_on_a_real_short_run_ends_within_budget_and_rolls_back_exactly() -> None:
    task = get_task("digits", seed=0)
    task = type(task)(**{**task.__dict__, "epochs": 6})
    dense = train_dense(task, 0)
    baseline = task.evaluate(dense, "val")["accuracy"]
    recipe = Recipe(epochs=8, update_every=5, patience=1, ramp=0.5)
    setting = Setting(task, dense.state_dict(), baseline, 0.0, False, recipe, lambda: None)
    model = setting.model()
    opt = task.optimizer(model, 0.05)
    budget = Budget(Cubic(0.0, 0.97, 0, setting.ramp_end(), frequency=5), baseline=baseline,
                    tolerance=0.0, patience=1)
    pruner = Pruner(model, budget.sparsity, update_every=5, optimizer=opt)
    budget.attach(pruner)
    checks = []

    def observe(value: float) -> None:
        before = copy.deepcopy(budget.saved)
        if budget.observe(value) == Decision.ROLLBACK:
            now = [model.state_dict(), pruner.state_dict(), opt.state_dict()]
            checks.append(_equal(now, before["states"]))

    finetune(setting, model, opt, lambda _: pruner.step() and None, observe)
    outcome = budget.finish()
    assert checks and all(checks)  # a zero tolerance forces at least one rollback
    final = task.evaluate(model, "val")["accuracy"]
    assert final >= budget.limit and final == outcome.metric
    assert pruner.sparsity() == pytest.approx(outcome.sparsity) and outcome.sparsity > 0.2


# -- Plateau and the learning rate around prune events ------------------------------------------


def test_plateau_reads_a_mapping_and_reduces_after_patience_step_by_step(
        mlp: nn.Module) -> None:
    opt = torch.optim.SGD(mlp.parameters(), lr=1.0)
    lr = ScheduledLR(opt, 1.0)
    plateau = Plateau(lr, patience=1, factor=0.5, cooldown=1, threshold=0.0, min_scale=0.2)
    sequence = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    acted = [plateau.observe({"accuracy": m, "loss": 0.0}) for m in sequence]
    assert acted == [False, False, False, True, False, False, True, False, False, True]
    assert lr.scale == pytest.approx(0.2)  # 1 -> 0.5 -> 0.25 -> min_scale 0.2
    with pytest.raises(ValueError, match="lack 'accuracy'"):
        plateau.observe({"loss": 0.1})


@pytest.mark.parametrize("mode", ["rewind", "restart"])
def test_prune_events_rewind_or_restart_the_learning_rate(mlp: nn.Module, mode: str) -> None:
    opt = torch.optim.SGD(mlp.parameters(), lr=1.0)
    lr = ScheduledLR(opt, Linear(1.0, 0.0, end_step=10))
    plateau = Plateau(lr, patience=0, factor=0.5)
    plateau.observe(0.5)
    plateau.observe(0.4)   # one reduction: scale 0.5
    pruner = Pruner(mlp, Linear(0.0, 0.5, begin_step=2, end_step=3), update_every=1)
    step = PruneLR(pruner, lr, mode=mode, to_step=1, plateau=plateau)
    events = []
    for _ in range(5):
        events.append(step(0)["prune_event"])
        lr.step()
    assert events == [0.0, 0.0, 0.0, 1.0, 0.0]  # the first update prunes nothing
    # The event at step 3 sent the schedule back (to 1, or 0 for a restart); two steps followed.
    expected_step = 3 if mode == "rewind" else 2
    assert lr.current_step == expected_step
    assert lr.scale == (0.5 if mode == "rewind" else 1.0)
    assert plateau.best == (0.5 if mode == "rewind" else -math.inf)
    with pytest.raises(ValueError, match="mode must be one of"):
        PruneLR(pruner, lr, mode="warm")  # type: ignore[arg-type]
