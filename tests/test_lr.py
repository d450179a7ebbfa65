"""Tests for secateurs.lr and secateurs.controllers.Plateau."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import SGD, Optimizer
from torch.optim import lr_scheduler as torch_lr

from secateurs.controllers import Plateau
from secateurs.lr import ScheduledLR, lambda_lr, rewind_
from secateurs.schedules import Constant, Cosine, Exponential, Linear, Step, Warmup

approx = pytest.approx


def make_optimizer(*lrs: float) -> SGD:
    """An SGD optimizer with one scalar parameter per group, one group per lr."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return SGD(groups, lr=lrs[0])


def lrs_over(optimizer: Optimizer, scheduler: Any, steps: int) -> list[list[float]]:
    """The group lrs at t = 0..steps, calling optimizer.step() then scheduler.step()."""
    history = [[float(g["lr"]) for g in optimizer.param_groups]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        history.append([float(g["lr"]) for g in optimizer.param_groups])
    return history


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert len(a) == len(b)
    return max(
        abs(x - y)
        for row_a, row_b in zip(a, b, strict=True)
        for x, y in zip(row_a, row_b, strict=True)
    )


# ---------------------------------------------------------------- ScheduledLR


def test_scheduled_lr_factor_golden() -> None:
    opt = make_optimizer(0.1, 0.4)
    sched = ScheduledLR(opt, Step(1.0, 0.5, step_size=2))
    assert sched.current_step == 0  # construction does not advance the step
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.4]
    # base_lr * 0.5 ** (t // 2)
    expected = [[0.1, 0.4], [0.1, 0.4], [0.05, 0.2], [0.05, 0.2], [0.025, 0.1]]
    assert lrs_over(opt, sched, 4) == expected
    assert sched.get_last_lr() == [0.025, 0.1]
    assert sched.current_step == 4


def test_scheduled_lr_absolute_golden() -> None:
    opt = make_optimizer(123.0)
    sched = ScheduledLR(opt, Linear(0.1, 0.0, end_step=4), mode="absolute")
    # 0.1 + (0 - 0.1) * t / 4: 0.1, 0.075, 0.05, 0.025, 0.0, 0.0 (group lr at construction ignored)
    history = [row[0] for row in lrs_over(opt, sched, 5)]
    assert history == approx([0.1, 0.075, 0.05, 0.025, 0.0, 0.0], abs=1e-16)
    assert sched.base_lrs == [123.0]


def test_scale_multiplies_immediately() -> None:
    opt = make_optimizer(0.2)
    sched = ScheduledLR(opt, Exponential(1.0, 0.5))
    sched.step()  # 0.2 * 0.5 = 0.1
    sched.scale = 0.25
    assert opt.param_groups[0]["lr"] == 0.2 * 0.5 * 0.25
    sched.step()  # 0.2 * 0.25 * 0.25
    assert sched.get_last_lr() == [0.2 * 0.25 * 0.25]
    with pytest.raises(ValueError, match="-1"):
        sched.scale = -1.0


def test_scheduled_lr_validates() -> None:
    with pytest.raises(TypeError, match="list"):
        ScheduledLR([], Constant(1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'relative'"):
        ScheduledLR(make_optimizer(0.1), 1.0, mode="relative")  # type: ignore[arg-type]


def test_scheduled_lr_keeps_existing_initial_lr() -> None:
    opt = make_optimizer(0.01)
    opt.param_groups[0]["initial_lr"] = 0.1  # as after resuming a torch scheduler
    sched = ScheduledLR(opt, Constant(0.5))
    assert sched.get_last_lr() == [0.05]


def test_added_param_group_gets_its_base_lr() -> None:
    opt = make_optimizer(0.1)
    sched = ScheduledLR(opt, Exponential(1.0, 0.5))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.8})
    sched.step()
    assert sched.get_last_lr() == [0.05, 0.4]


@pytest.mark.parametrize(
    ("make_torch", "schedule", "steps"),
    [
        (lambda o: torch_lr.ExponentialLR(o, gamma=0.9), Exponential(1.0, 0.9), 60),
        (lambda o: torch_lr.StepLR(o, step_size=7, gamma=0.3), Step(1.0, 0.3, step_size=7), 60),
        (
            lambda o: torch_lr.MultiStepLR(o, milestones=[5, 9], gamma=0.1),
            Step(1.0, 0.1, milestones=[5, 9]),
            20,
        ),
        # factor mode: base_lr * (f + (1 - f) * c) with f = eta_min / base_lr per group
        (lambda o: torch_lr.CosineAnnealingLR(o, T_max=25), Cosine(1.0, 0.0, end_step=25), 25),
    ],
)
def test_matches_torch_step_for_step(
    make_torch: Callable[[Optimizer], torch_lr.LRScheduler], schedule: Any, steps: int
) -> None:
    ours_opt, torch_opt = make_optimizer(0.1, 0.03), make_optimizer(0.1, 0.03)
    ours = lrs_over(ours_opt, ScheduledLR(ours_opt, schedule), steps)
    theirs = lrs_over(torch_opt, make_torch(torch_opt), steps)
    assert max_abs_diff(ours, theirs) < 1e-12


def test_matches_torch_cosine_with_eta_min_in_absolute_mode() -> None:
    ours_opt, torch_opt = make_optimizer(0.1), make_optimizer(0.1)
    ours = ScheduledLR(ours_opt, Cosine(0.1, 0.001, end_step=20), mode="absolute")
    theirs = torch_lr.CosineAnnealingLR(torch_opt, T_max=20, eta_min=0.001)
    assert max_abs_diff(lrs_over(ours_opt, ours, 20), lrs_over(torch_opt, theirs, 20)) < 1e-12


def test_rewind() -> None:
    opt = make_optimizer(1.0)
    sched = ScheduledLR(opt, Linear(1.0, 0.0, end_step=8))
    lrs_over(opt, sched, 6)
    assert sched.get_last_lr() == [0.25]  # 1 - 6/8
    sched.scale = 0.5
    sched.rewind(2)
    assert sched.current_step == 2
    assert sched.get_last_lr() == [0.75 * 0.5]  # (1 - 2/8) * scale; the scale is kept
    sched.step()
    assert sched.get_last_lr() == [0.625 * 0.5]  # t = 3
    rewind_(sched)  # the functional form, default to_step=0
    assert sched.current_step == 0
    assert sched.get_last_lr() == [0.5]
    with pytest.raises(ValueError, match=r"to_step.*-1"):
        sched.rewind(-1)


def train(
    steps: int, resume_at: int | None = None
) -> tuple[torch.Tensor, list[float], dict[str, Any]]:
    """Train a small model under ScheduledLR + Plateau; optionally checkpoint and resume."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = torch.randn(16, 4), torch.randn(16, 1)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = ScheduledLR(opt, Warmup(Cosine(1.0, 0.1, end_step=steps), 3))
    plateau = Plateau(sched, mode="min", patience=1, factor=0.5)
    lrs = []
    for t in range(steps):
        if t == resume_at:
            blob = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "plateau": plateau.state_dict(),
                },
                blob,
            )
            blob.seek(0)
            state = torch.load(blob, weights_only=True)
            model = torch.nn.Linear(4, 1)
            model.load_state_dict(state["model"])
            opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
            sched = ScheduledLR(opt, Warmup(Cosine(1.0, 0.1, end_step=steps), 3))
            plateau = Plateau(sched, mode="min", patience=1, factor=0.5)
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            plateau.load_state_dict(state["plateau"])
        loss = torch.nn.functional.mse_loss(model(data[0]), data[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        plateau.observe(round(loss.item(), 1))  # coarse metric so the plateau fires
        lrs.append(sched.get_last_lr()[0])
    return model.weight.detach().clone(), lrs, {"scale": sched.scale}


def test_state_dict_round_trip_resumes_exactly() -> None:
    weight, lrs, extra = train(30)
    resumed_weight, resumed_lrs, resumed_extra = train(30, resume_at=13)
    assert extra["scale"] < 1.0  # the plateau did act, so its state mattered
    assert resumed_lrs == lrs
    assert torch.equal(resumed_weight, weight)
    assert resumed_extra == extra


def test_load_state_dict_validates() -> None:
    sched = ScheduledLR(make_optimizer(0.1), Constant(1.0))
    other = ScheduledLR(make_optimizer(0.1, 0.2), Constant(1.0))
    with pytest.raises(ValueError, match="2 base lrs"):
        sched.load_state_dict(other.state_dict())
    absolute = ScheduledLR(make_optimizer(0.1), Constant(1.0), mode="absolute")
    with pytest.raises(ValueError, match="'absolute'"):
        sched.load_state_dict(absolute.state_dict())


# ---------------------------------------------------------------- lambda_lr


def test_lambda_lr_equals_scheduled_lr() -> None:
    schedule = Warmup(Cosine(1.0, 0.05, end_step=20), 5, initial=0.1)
    ours_opt, torch_opt = make_optimizer(0.1, 0.5), make_optimizer(0.1, 0.5)
    torch_sched = lambda_lr(torch_opt, schedule)
    assert isinstance(torch_sched, torch_lr.LambdaLR)
    ours = lrs_over(ours_opt, ScheduledLR(ours_opt, schedule), 30)
    assert lrs_over(torch_opt, torch_sched, 30) == ours  # bit for bit


def test_lambda_lr_state_dict_holds_no_secateurs_objects() -> None:
    sched = lambda_lr(make_optimizer(0.1), Exponential(1.0, 0.9))
    blob = io.BytesIO()
    torch.save(sched.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)  # would fail on a pickled Schedule
    assert state["lr_lambdas"] == [None]
    assert state["last_epoch"] == 0


# ---------------------------------------------------------------- rewind_


@pytest.mark.parametrize(
    "make_torch",
    [
        lambda o: torch_lr.StepLR(o, step_size=3, gamma=0.5),
        lambda o: torch_lr.CosineAnnealingLR(o, T_max=12, eta_min=0.01),
        lambda o: torch_lr.ExponentialLR(o, gamma=0.8),
        lambda o: torch_lr.LinearLR(o, start_factor=0.25, total_iters=6),
        lambda o: torch_lr.LambdaLR(o, lambda t: 1.0 / (1 + t)),
        lambda o: torch_lr.MultiplicativeLR(o, lambda t: 0.9),
        lambda o: torch_lr.OneCycleLR(o, max_lr=1.0, total_steps=30),
    ],
)
@pytest.mark.parametrize("to_step", [0, 1, 4])
def test_rewind_torch_scheduler_matches_fresh(
    make_torch: Callable[[Optimizer], torch_lr.LRScheduler], to_step: int
) -> None:
    opt = make_optimizer(0.1, 0.02)
    sched = make_torch(opt)
    lrs_over(opt, sched, 9)
    rewind_(sched, to_step)
    fresh_opt = make_optimizer(0.1, 0.02)
    fresh = make_torch(fresh_opt)
    lrs_over(fresh_opt, fresh, to_step)
    assert sched.last_epoch == fresh.last_epoch == to_step
    assert sched.get_last_lr() == approx(fresh.get_last_lr(), abs=1e-12)
    # continuing after the rewind follows the schedule from to_step
    assert max_abs_diff(lrs_over(opt, sched, 8), lrs_over(fresh_opt, fresh, 8)) < 1e-12


def test_rewind_unsupported_torch_scheduler_raises() -> None:
    opt = make_optimizer(0.1)
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        rewind_(torch_lr.ReduceLROnPlateau(opt), 0)
    sequential = torch_lr.SequentialLR(
        opt,
        [torch_lr.ConstantLR(opt, 0.5, total_iters=2), torch_lr.ExponentialLR(opt, 0.9)],
        milestones=[2],
    )
    lrs_over(opt, sequential, 3)
    with pytest.raises(TypeError, match="SequentialLR"):
        rewind_(sequential, 1)
    assert sequential.last_epoch == 3  # left untouched
    with pytest.raises(TypeError, match="dict"):
        rewind_({}, 0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- Plateau

# mode=min, factor=0.5, patience=1, cooldown=1, min_lr=0.02, threshold=1e-4 (rel), lr 0.1.
# "better" means metric < best * (1 - 1e-4). Hand trace (bad = num_bad_epochs, cd = cooldown):
#  1: 1.00 best=1.00 bad=0            |  9: 0.85 bad=2 > 1 -> lr 0.025, cd=1, bad=0
#  2: 0.90 best=0.90 bad=0            | 10: 0.85 bad=1, in cooldown -> cd=0, bad=0
#  3: 0.95 bad=1                      | 11: 0.85 bad=1
#  4: 0.95 bad=2 > 1 -> lr 0.05, cd=1 | 12: 0.85 bad=2 -> max(0.0125, 0.02) = 0.02, cd=1
#  5: 0.95 bad=1, in cooldown -> 0    | 13: 0.85 cooldown -> cd=0, bad=0
#  6: 0.95 bad=1                      | 14: 0.85 bad=1
#  7: 0.80 best=0.80 bad=0            | 15: 0.85 bad=2 -> max(0.01, 0.02) = 0.02: unchanged,
#  8: 0.85 bad=1                      |     so observe() returns False
METRICS = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85, 0.85]
REDUCED = [False] * 3 + [True] + [False] * 4 + [True, False, False, True, False, False, False]
LRS = [0.1] * 3 + [0.05] * 5 + [0.025] * 3 + [0.02] * 4


def test_plateau_scripted_decisions() -> None:
    opt, torch_opt = make_optimizer(0.1), make_optimizer(0.1)
    plateau = Plateau(opt, mode="min", factor=0.5, patience=1, cooldown=1, min_lr=0.02)
    reference = torch_lr.ReduceLROnPlateau(
        torch_opt, mode="min", factor=0.5, patience=1, cooldown=1, min_lr=0.02
    )
    for metric, reduced, lr in zip(METRICS, REDUCED, LRS, strict=True):
        assert plateau.observe(metric) is reduced
        reference.step(metric)
        assert opt.param_groups[0]["lr"] == approx(lr, abs=1e-15)
        assert opt.param_groups[0]["lr"] == torch_opt.param_groups[0]["lr"]
        assert (plateau.best, plateau.num_bad_epochs, plateau.cooldown_counter) == (
            reference.best,
            reference.num_bad_epochs,
            reference.cooldown_counter,
        )


def test_plateau_max_mode_abs_threshold() -> None:
    opt = make_optimizer(1.0)
    plateau = Plateau(opt, factor=0.1, patience=0, threshold=0.05, threshold_mode="abs")
    # max mode, better means metric > best + 0.05; patience 0 reduces on the first bad epoch
    assert plateau.observe(0.50) is False  # best = 0.50
    assert plateau.observe(0.54) is True  # 0.54 <= 0.55: bad -> lr 0.1
    assert plateau.observe(0.56) is False  # 0.56 > 0.55: best = 0.56
    assert plateau.observe(0.60) is True  # 0.60 <= 0.61 -> lr 0.01
    assert opt.param_groups[0]["lr"] == approx(0.01, abs=1e-15)


plateau_configs = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(["min", "max"]),
        "factor": st.sampled_from([0.1, 0.5, 0.9]),
        "patience": st.integers(0, 3),
        "threshold": st.sampled_from([0.0, 1e-4, 0.1]),
        "threshold_mode": st.sampled_from(["rel", "abs"]),
        "cooldown": st.integers(0, 2),
        "min_lr": st.sampled_from([0.0, 1e-3]),
    }
)


@settings(max_examples=80, deadline=None)
@given(plateau_configs, st.lists(st.sampled_from([0.0, 0.5, 0.9, 1.0, 1.1, -2.0]), max_size=30))
def test_plateau_matches_torch(config: dict[str, Any], metrics: list[float]) -> None:
    opt, torch_opt = make_optimizer(0.1, 0.5), make_optimizer(0.1, 0.5)
    plateau = Plateau(opt, **config)
    reference = torch_lr.ReduceLROnPlateau(torch_opt, **config)
    for metric in metrics:
        before = [g["lr"] for g in opt.param_groups]
        reduced = plateau.observe(metric)
        reference.step(metric)
        after = [g["lr"] for g in opt.param_groups]
        assert after == [g["lr"] for g in torch_opt.param_groups]
        assert reduced == (after != before)
        assert plateau.num_bad_epochs == reference.num_bad_epochs
        assert plateau.cooldown_counter == reference.cooldown_counter


def test_plateau_composes_with_scheduled_lr() -> None:
    opt = make_optimizer(0.2)
    schedule = Cosine(1.0, 0.0, end_step=10)
    sched = ScheduledLR(opt, schedule)
    plateau = Plateau(sched, mode="max", patience=0, factor=0.5, min_scale=0.3)
    # accuracy: rises, stalls (scale 0.5), rises, stalls (scale max(0.25, 0.3) = 0.3), stalls
    metrics = [0.5, 0.6, 0.6, 0.7, 0.7, 0.7]
    scales = [1.0, 1.0, 0.5, 0.5, 0.3, 0.3]
    for t, (metric, scale) in enumerate(zip(metrics, scales, strict=True), start=1):
        opt.step()
        sched.step()
        plateau.observe(metric)
        assert sched.scale == scale
        assert opt.param_groups[0]["lr"] == 0.2 * schedule(t) * scale


def test_plateau_validates() -> None:
    opt = make_optimizer(0.1)
    with pytest.raises(ValueError, match="nan"):
        Plateau(opt).observe(math.nan)
    with pytest.raises(ValueError, match=r"factor.*\(0, 1\).*1.5"):
        Plateau(opt, factor=1.5)
    with pytest.raises(ValueError, match="'median'"):
        Plateau(opt, mode="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"patience.*-1"):
        Plateau(opt, patience=-1)
    with pytest.raises(ValueError, match=r"min_lr.*0.01.*ScheduledLR"):
        Plateau(ScheduledLR(opt, 1.0), min_lr=0.01)
    with pytest.raises(ValueError, match=r"min_scale.*0.1.*optimizer"):
        Plateau(opt, min_scale=0.1)
    with pytest.raises(ValueError, match=r"1 entries.*\[0.0, 0.0\]"):
        Plateau(opt, min_lr=[0.0, 0.0])
    with pytest.raises(TypeError, match="StepLR"):
        Plateau(torch_lr.StepLR(opt, 2))  # type: ignore[arg-type]


def test_plateau_tensor_metric_and_per_group_min_lr() -> None:
    opt = make_optimizer(0.1, 0.1)
    plateau = Plateau(opt, mode="min", patience=0, factor=0.1, min_lr=[0.05, 0.0])
    plateau.observe(torch.tensor(1.0))
    assert plateau.observe(torch.tensor(2.0)) is True
    assert [g["lr"] for g in opt.param_groups] == approx([0.05, 0.01], abs=1e-15)


def test_plateau_state_dict_round_trip() -> None:
    first, second = (
        Plateau(make_optimizer(0.1), patience=2),
        Plateau(make_optimizer(0.1), patience=2),
    )
    metrics = [0.1, 0.2, 0.2, 0.2, 0.1, 0.3, 0.3]
    for metric in metrics[:4]:
        first.observe(metric)
    second.load_state_dict(first.state_dict())
    assert (
        second.state_dict()
        == first.state_dict()
        == {
            "best": 0.2,
            "num_bad_epochs": 2,
            "cooldown_counter": 0,
            "num_observations": 4,
        }
    )
    assert [first.observe(m) for m in metrics[4:]] == [second.observe(m) for m in metrics[4:]]
    with pytest.raises(KeyError, match="best"):
        second.load_state_dict({})
