"""The Pruner against the invariants of DESIGN.md (1-4 and 6)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from conftest import SmallCNN, train_steps
from secateurs import Pruner
from secateurs.criteria import Clipping
from secateurs.schedules import Cubic, Linear
from secateurs.selection import nm_layout

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
}


def zeros(mask: torch.Tensor) -> int:
    return int((~mask).sum())


# -- invariant 1: realised sparsity equals the target within one element per group --------

@pytest.mark.parametrize("scope", ["layer", "row", "global"])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9, 0.97])
def test_realised_sparsity_is_exact(mlp, scope, s):
    pruner = Pruner(mlp, s, scope=scope)
    pruner.step()
    if scope == "global":
        total = sum(m.numel() for m in pruner.masks.values())
        assert sum(zeros(m) for m in pruner.masks.values()) == round(s * total)
    for t in pruner.targets:
        mask, w = pruner.masks[t.name], t.param
        assert torch.equal(w == 0, ~mask) or s == 0 or scope == "global"
        assert torch.all(w[~mask] == 0)
        if scope == "layer":
            assert zeros(mask) == round(s * mask.numel())
        if scope == "row":
            assert torch.all((~mask).sum(1) == round(s * mask.shape[1]))


@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_nm_pruner_is_nm_in_every_group(mlp, nm):
    pruner = Pruner(mlp, granularity=nm)
    pruner.step()
    n = int(nm.split(":")[0])
    m = int(nm.split(":")[1])
    for t in pruner.targets:
        groups = nm_layout(t.param != 0, m)
        assert torch.all(groups.sum(1) <= n)
        assert torch.all(nm_layout(pruner.masks[t.name], m).sum(1) == n)


def test_nm_on_convolutions_groups_input_channels(cnn):
    pruner = Pruner(cnn, granularity="2:4", targets=["features.2", "head.1", "head.3"])
    pruner.step()
    w = cnn.features[2].weight  # (16, 8, 3, 3): groups of 4 input channels per position
    kept = (w != 0).movedim(1, -1).reshape(-1, 4).sum(1)
    assert torch.all(kept <= 2)


# -- invariant 2: a masked weight stays exactly zero, optimizer state included ------------

@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_masked_weights_stay_zero_for_50_steps(mlp, opt_name):
    opt = OPTIMIZERS[opt_name](mlp.parameters())
    train_steps(mlp, opt, 5)  # optimizer state exists before pruning starts
    pruner = Pruner(mlp, 0.8, optimizer=opt)
    masks_seen = []

    def check() -> None:
        pruner.step()
        masks_seen.append({k: v.clone() for k, v in pruner.masks.items()})
        for t in pruner.targets:
            mask = pruner.masks[t.name]
            assert torch.all(t.param[~mask] == 0.0)
            for value in opt.state[t.param].values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    assert torch.all(value[~mask] == 0.0)

    train_steps(mlp, opt, 50, after_step=check, seed=1)
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-2)
    assert all(torch.equal(masks_seen[0][k], masks_seen[-1][k]) for k in masks_seen[0])


# -- invariant 3: masks are nested under a monotone schedule ------------------------------

@pytest.mark.parametrize("criterion", ["magnitude", "random"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masks_are_nested_under_a_monotone_schedule(mlp, criterion, scope):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    schedule = Cubic(initial=0.0, final=0.9, begin_step=2, end_step=40, frequency=2)
    pruner = Pruner(mlp, schedule, criterion, scope=scope, update_every=4, optimizer=opt)
    history = []

    def record() -> None:
        if pruner.step():
            history.append({k: v.clone() for k, v in pruner.masks.items()})

    train_steps(mlp, opt, 48, after_step=record)
    assert len(history) >= 5
    for before, after in itertools.pairwise(history):
        for name in before:
            assert not torch.any(after[name] & ~before[name]), "a pruned weight came back"
    assert pruner.sparsity() == pytest.approx(0.9, abs=1e-3)


def test_updates_happen_only_when_due(mlp):
    pruner = Pruner(mlp, Linear(0.0, 0.5, begin_step=0, end_step=10), update_every=5)
    updates = [pruner.step() for _ in range(16)]
    assert [i for i, u in enumerate(updates) if u] == [0, 5, 10]  # t=0 reaches sparsity 0
    assert pruner.sparsity() == pytest.approx(0.5, abs=1e-2)
    assert pruner.step_count == 16


# -- invariant 4: state_dict -> load_state_dict resumes bit for bit -----------------------

def _run(criterion_factory, steps, state=None, stop_at=None):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = Pruner(model, Cubic(0.0, 0.8, begin_step=0, end_step=12), criterion_factory(),
                    scope="global", update_every=3, optimizer=opt)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        pruner.load_state_dict(state["pruner"])
        start = state["done"]
    for i in range(start, steps):
        train_steps(model, opt, 1, after_step=pruner.step, seed=i, in_shape=(1, 8, 8),
                    classes=10)
        if stop_at is not None and i + 1 == stop_at:
            return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                  "pruner": pruner.state_dict(), "done": i + 1})
    return model, pruner


@pytest.mark.parametrize("criterion", [
    lambda: "magnitude", lambda: "random", lambda: Clipping(margin=0.2),
], ids=["magnitude", "random", "clipping"])
def test_resume_is_bit_for_bit(criterion):
    full_model, full_pruner = _run(criterion, 20)
    state = _run(criterion, 20, stop_at=7)
    resumed_model, resumed_pruner = _run(criterion, 20, state=state)
    for (k, a), b in zip(full_model.state_dict().items(),
                         resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for k in full_pruner.masks:
        assert torch.equal(full_pruner.masks[k], resumed_pruner.masks[k])
    assert full_pruner.step_count == resumed_pruner.step_count == 20


def test_state_dict_keys_of_the_model_never_change(cnn):
    keys = list(cnn.state_dict())
    pruner = Pruner(cnn, 0.5)
    pruner.step()
    assert list(cnn.state_dict()) == keys
    assert all(v.dtype == torch.bool for v in pruner.masks.values())


def test_load_state_dict_rejects_foreign_masks(mlp):
    pruner = Pruner(mlp, 0.5)
    before = {k: v.clone() for k, v in pruner.masks.items()}
    state = pruner.state_dict()
    state["masks"]["0.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="0.weight"):
        pruner.load_state_dict(state)
    assert all(torch.equal(before[k], pruner.masks[k]) for k in before)


# -- dynamic weight clipping: weights come back ---------------------------------------------

def test_clipping_threshold_prunes_and_lets_weights_return():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.9, 0.55, -0.3], [0.6, -0.05, 0.2, 0.8]]))
    pruner = Pruner(nn.Sequential(layer), criterion=Clipping(threshold=0.5, margin=0.2))
    assert pruner.step()
    assert pruner.masks["0.weight"].tolist() == [[False, True, True, False],
                                                 [True, False, False, True]]
    assert layer.weight[0].tolist() == [0.0, pytest.approx(0.9), pytest.approx(0.55), 0.0]

    def optimizer_step(update: list[float]) -> None:
        with torch.no_grad():  # what an optimizer step adds to row 0
            layer.weight[0] += torch.tensor(update)
        pruner.step()

    # Pruned weights keep training behind the mask: 0.1 + 0.2 + 0.2 = 0.5 is still below
    # the regrowth threshold 0.5 * 1.2 = 0.6, so the weight stays at zero ...
    optimizer_step([0.2, 0.0, 0.0, -0.1])
    optimizer_step([0.2, 0.0, -0.1, -0.1])  # 0.55 - 0.1 = 0.45 < 0.5: pruned
    assert pruner.masks["0.weight"][0].tolist() == [False, True, False, False]
    assert layer.weight[0].tolist() == [0.0, pytest.approx(0.9), 0.0, 0.0]
    # ... and returns with its accumulated value once that crosses it; -0.3 - 0.2 - 0.05
    # = -0.55 is inside the band and stays pruned.
    optimizer_step([0.2, 0.0, 0.0, -0.05])
    assert pruner.masks["0.weight"][0].tolist() == [True, True, False, False]
    assert layer.weight[0].tolist() == [pytest.approx(0.7), pytest.approx(0.9), 0.0, 0.0]


def test_clipping_from_a_target_sparsity_is_exact_and_regrows(mlp):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.5, momentum=0.9)
    pruner = Pruner(mlp, 0.7, Clipping(), scope="layer", optimizer=opt)
    returned = 0
    previous = None

    def step() -> None:
        nonlocal returned, previous
        pruner.step()
        if previous is not None:
            returned += sum(int((m & ~previous[k]).sum()) for k, m in pruner.masks.items())
        previous = {k: v.clone() for k, v in pruner.masks.items()}
        for t in pruner.targets:
            assert zeros(pruner.masks[t.name]) == round(0.7 * t.param.numel())

    train_steps(mlp, opt, 30, after_step=step)
    assert returned > 0, "no pruned weight ever came back"
    # Optimizer state is left alone for a criterion that regrows by design.
    assert any(torch.any(opt.state[t.param]["momentum_buffer"][~pruner.masks[t.name]] != 0)
               for t in pruner.targets)


# -- invariant 6: bad input raises a clear error before any weight changes -------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sparsity": -0.1}, r"\[0, 1\).*-0.1"),
    ({"sparsity": 1.0}, r"\[0, 1\)"),
    ({"sparsity": Linear(0.0, 1.2, end_step=10)}, r"spans \[0, 1.2\]"),
    ({"sparsity": None}, "sparsity is required"),
    ({"sparsity": 0.6, "granularity": "2:4"}, r"\[0, 0.5\]"),
    ({"sparsity": 0.5, "granularity": "4:4"}, "N < M"),
    ({"sparsity": 0.5, "granularity": "diagonal"}, "unknown granularity 'diagonal'"),
    ({"sparsity": 0.5, "scope": "model"}, "unknown scope 'model'"),
    ({"sparsity": 0.5, "criterion": "magic"}, "unknown criterion 'magic'.*magnitude"),
    ({"sparsity": 0.5, "update_every": 0}, "update_every.*0"),
    ({"sparsity": 0.5, "targets": r"^decoder"}, "matched no parameter"),
    ({"sparsity": {"0.weight": 0.5, "bogus": 0.1}}, "target 'bogus'"),
    ({"sparsity": {"0.weight": 0.5}, "scope": "global", "targets": ["0"]}, "per-target"),
    ({"sparsity": 0.5, "criterion": Clipping(threshold=0.1)}, "selects by threshold"),
])
def test_bad_arguments_raise_before_anything_changes(mlp, kwargs, message):
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(ValueError, match=message):
        Pruner(mlp, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_shapes_not_divisible_by_m_are_refused():
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"'0.weight'.*6 input features.*M=4"):
        Pruner(model, granularity="2:4")


def test_nan_weights_raise_and_change_nothing(mlp):
    pruner = Pruner(mlp, 0.5)
    with torch.no_grad():
        mlp[2].weight[0, 0] = float("nan")
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(ValueError, match="'2.weight' holds NaN or Inf"):
        pruner.step()
    after = mlp.state_dict()
    assert all(torch.equal(before[k].nan_to_num(7.0), after[k].nan_to_num(7.0)) for k in after)
    assert pruner.sparsity() == 0.0


# -- reading -------------------------------------------------------------------------------

def test_summary_counts(mlp):
    pruner = Pruner(mlp, 0.5)
    pruner.step()
    rows = pruner.summary()
    assert [r.name for r in rows] == ["0.weight", "2.weight", "4.weight"]
    assert rows[0].params == 16 * 32 and rows[0].nonzero == 16 * 32 // 2
    text = str(rows)
    assert "total" in text and "50.0%" in text and "32x16" in text


def test_per_target_sparsities(mlp):
    pruner = Pruner(mlp, {"0.weight": 0.2, "2.weight": Linear(0.0, 0.8, end_step=1)})
    pruner.step()
    assert pruner.sparsity("0.weight") == pytest.approx(0.2, abs=1e-3)
    assert pruner.sparsity("2.weight") == 0.0
    assert [t.name for t in pruner.targets] == ["0.weight", "2.weight"]
    pruner.step()
    assert pruner.sparsity("2.weight") == pytest.approx(0.8, abs=1e-3)


def test_the_per_step_path_allocates_no_full_size_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_steps(model, opt, 1, in_shape=(256,), classes=256)
    pruner = Pruner(model, 0.9, optimizer=opt)
    pruner.step()
    with torch.profiler.profile(profile_memory=True) as prof:
        pruner.step()
    allocated = sum(e.self_cpu_memory_usage for e in prof.key_averages()
                    if e.self_cpu_memory_usage > 0)
    assert allocated < 256 * 4, f"steady-state step allocated {allocated} bytes"
