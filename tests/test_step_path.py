"""The per-step path: masked gradients between mask changes, weights and optimizer state
zeroed when masks change, and the same training, bit for bit, as zeroing everything at
every step (the path taken for optimizers outside ``ELEMENTWISE_OPTIMIZERS``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from conftest import reference
from secateurs import Pruner
from secateurs.criteria import Clipping
from secateurs.masks import ELEMENTWISE_OPTIMIZERS, is_elementwise, zero_masked_
from secateurs.schedules import Cubic

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Factory] = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                              weight_decay=1e-2, foreach=False),
    "sgd-dampening-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.5,
                                                     fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-l2-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "adamw-fused-maximize": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1,
                                                        fused=True, maximize=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=0.1,
                                         decoupled_weight_decay=True),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=0.1),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=0.1),
    "rmsprop-centred": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True,
                                                     weight_decay=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=0.1),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.1),
    "rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
    "asgd": lambda p: torch.optim.ASGD(p, lr=1e-2, weight_decay=0.1),
}
#: Whose per-element state is zero wherever the weight is masked (the others keep a
#: harmless positive floor there: Adamax's eps, Rprop's minimum step size).
ZERO_STATE = {"sgd-momentum-wd", "sgd-nesterov", "sgd-dampening-fused", "adam",
              "adam-l2-foreach", "adamw-amsgrad", "adamw-fused-maximize", "nadam", "radam",
              "rmsprop-centred", "adagrad", "adadelta", "asgd"}


class Branchy(nn.Module):
    """A trunk and two heads; a step may use one head only, leaving the other without a
    gradient (or with the zeros ``zero_grad(set_to_none=False)`` left)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(16, 32)
        self.mid = nn.Linear(32, 32)
        self.a = nn.Linear(32, 4)
        self.b = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, head: str = "both") -> torch.Tensor:
        h = torch.relu(self.mid(torch.relu(self.trunk(x))))
        if head == "a":
            return self.a(h)
        if head == "b":
            return self.b(h)
        return self.a(h) + self.b(h)


def train(factory: Factory, steps: int = 24, *, accumulate: int = 1, set_to_none: bool = True,
          clip: float | None = None, closure: bool = False,
          freeze_until: int | None = None, criterion: object = "magnitude",
          ) -> tuple[nn.Module, Pruner, torch.optim.Optimizer]:
    """Train ``Branchy`` under a pruner along a cubic schedule, with state from before the
    first mask (dense warm-up steps) and every kind of step the path must survive."""
    torch.manual_seed(0)
    model = Branchy()
    if freeze_until is not None:
        model.mid.requires_grad_(False)
    opt = factory(list(model.parameters()))
    pruner = Pruner(model, Cubic(0.0, 0.8, begin_step=3, end_step=15), criterion,
                    update_every=4, optimizer=opt)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == freeze_until:
            model.mid.requires_grad_(True)
        head = ["both", "a", "b"][step % 3]  # a head without a gradient in this step
        batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
                   for _ in range(accumulate)]

        def backward(batches: list[tuple[torch.Tensor, torch.Tensor]] = batches,
                     head: str = head) -> torch.Tensor:
            opt.zero_grad(set_to_none=set_to_none)
            for x, y in batches:  # gradient accumulation: one optimizer step per k batches
                loss = nn.functional.cross_entropy(model(x, head), y) / len(batches)
                loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            return loss

        if closure:
            opt.step(backward)
        else:
            backward()
            opt.step()
        pruner.step()
    return model, pruner, opt


def assert_masked_zero(model: nn.Module, pruner: Pruner, opt: torch.optim.Optimizer,
                       state: bool = True) -> None:
    assert pruner.sparsity() == pytest.approx(0.8, abs=0.01)
    for t in pruner.targets:
        mask = pruner.masks[t.name]
        assert torch.all(t.param[~mask] == 0.0), t.name
        for key, value in (opt.state[t.param].items() if state else ()):
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                assert torch.all(value[~mask] == 0.0), (t.name, key)


def assert_same(a: tuple[nn.Module, Pruner, torch.optim.Optimizer],
                b: tuple[nn.Module, Pruner, torch.optim.Optimizer]) -> None:
    for (k, x), y in zip(a[0].state_dict().items(), b[0].state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    for k in a[1].masks:
        assert torch.equal(a[1].masks[k], b[1].masks[k]), k


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masked_gradients_train_exactly_as_masking_everything_every_step(name: str) -> None:
    fast = train(OPTIMIZERS[name])
    probe = [nn.Parameter(torch.zeros(1))]
    assert is_elementwise(fast[2]) and not is_elementwise(reference(OPTIMIZERS[name])(probe))
    assert_masked_zero(*fast, state=name in ZERO_STATE)
    assert_same(fast, train(reference(OPTIMIZERS[name])))


@pytest.mark.parametrize("name", ["sgd-nesterov", "adamw-amsgrad"])
@pytest.mark.parametrize("how", ["accumulate", "keep-grads", "clip", "closure", "frozen"])
def test_the_path_survives_every_kind_of_step(name: str, how: str) -> None:
    kwargs = {"accumulate": {"accumulate": 3}, "keep-grads": {"set_to_none": False},
              "clip": {"clip": 0.1}, "closure": {"closure": True},
              "frozen": {"freeze_until": 10}}[how]
    fast = train(OPTIMIZERS[name], **kwargs)  # type: ignore[arg-type]
    assert_masked_zero(*fast)
    assert_same(fast, train(reference(OPTIMIZERS[name]), **kwargs))  # type: ignore[arg-type]


def test_a_criterion_that_regrows_keeps_its_path() -> None:
    _, pruner, opt = train(OPTIMIZERS["sgd-nesterov"], criterion=Clipping(margin=0.1))
    assert pruner._gradient_mask is None  # no gradient masking: pruned weights train on
    for t in pruner.targets:
        assert torch.all(t.param[~pruner.masks[t.name]] == 0.0)
    assert any(torch.any(opt.state[t.param]["momentum_buffer"][~pruner.masks[t.name]] != 0)
               for t in pruner.targets)


def _masking_ops(fn: Callable[[], object]) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mul_", "aten::where"))


def test_steady_steps_touch_neither_weights_nor_state_and_mask_gradients_once() -> None:
    model, pruner, opt = train(OPTIMIZERS["adamw-amsgrad"])
    assert pruner.caught_up()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    twin = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    twin.load_state_dict(opt.state_dict())  # the same update, without the hook
    assert _masking_ops(opt.step) == _masking_ops(twin.step) + len(pruner.masks.sparse_names())
    assert _masking_ops(pruner.step) == 0


def _step_after(model: nn.Module, opt: torch.optim.Optimizer, pruner: Pruner,
                between: Callable[[], None]) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
    between()
    opt.step()
    pruner.step()


@pytest.mark.parametrize("how", ["added-in-place", "assigned", "masks-changed"])
def test_gradients_changed_after_the_backward_pass_are_masked_before_the_step(how: str) -> None:
    model, pruner, opt = train(OPTIMIZERS["sgd-momentum-wd"])
    params = [t.param for t in pruner.targets]

    def between() -> None:
        if how == "added-in-place":  # e.g. noise, or a compressed all-reduce
            for p in params:
                assert p.grad is not None
                p.grad.add_(torch.randn_like(p))
        elif how == "assigned":  # a gradient made outside autograd
            for p in params:
                p.grad = torch.randn_like(p)
        else:  # new masks between the backward pass and the step
            pruner.masks.set_(pruner.targets[0].name,
                              torch.rand_like(params[0]) < 0.5)
            for p in params:
                assert p.grad is not None
                p.grad.add_(1.0)

    for step in range(3):
        _step_after(model, opt, pruner, between)
        for t in pruner.targets:
            mask = pruner.masks[t.name]
            assert torch.all(t.param[~mask] == 0.0), (step, t.name)
            assert torch.all(opt.state[t.param]["momentum_buffer"][~mask] == 0.0)


def test_weights_and_state_are_zeroed_again_when_masks_change_from_outside() -> None:
    model, pruner, opt = train(OPTIMIZERS["adam"])
    other = {k: torch.rand_like(v, dtype=torch.float) < 0.5 for k, v in pruner.masks.items()}
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
    state = pruner.state_dict()
    state["masks"] = other
    pruner.load_state_dict(state)
    opt.step()  # Adam's moments are non-zero where the new masks prune
    pruner.step()
    for t in pruner.targets:
        mask = pruner.masks[t.name]
        assert torch.equal(mask, other[t.name])
        assert torch.all(t.param[~mask] == 0.0)
        assert torch.all(opt.state[t.param]["exp_avg"][~mask] == 0.0)
    pruner.adopt_masks_({t.name: torch.zeros_like(pruner.masks[t.name])
                         for t in pruner.targets[:1]})
    assert torch.all(pruner.targets[0].param == 0.0)
    assert torch.all(opt.state[pruner.targets[0].param]["exp_avg_sq"] == 0.0)


def test_targets_the_optimizer_does_not_update_are_zeroed_every_step() -> None:
    torch.manual_seed(0)
    model = Branchy()
    opt = torch.optim.SGD(model.trunk.parameters(), lr=0.1, momentum=0.9)
    other = torch.optim.SGD([p for n, p in model.named_parameters()
                             if not n.startswith("trunk")], lr=0.1, momentum=0.9)
    pruner = Pruner(model, 0.7, optimizer=opt)
    for _ in range(5):
        opt.zero_grad()
        other.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 16)),
                                    torch.randint(0, 4, (8,))).backward()
        opt.step()
        other.step()  # its momentum is not masked: the weights are zeroed after it instead
        pruner.step()
        for t in pruner.targets:
            assert torch.all(t.param[~pruner.masks[t.name]] == 0.0), t.name


def test_without_an_optimizer_weights_are_zeroed_every_step() -> None:
    torch.manual_seed(0)
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(model, 0.7)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 16)),
                                    torch.randint(0, 4, (8,))).backward()
        opt.step()
        pruner.step()
        for t in pruner.targets:
            assert torch.all(t.param[~pruner.masks[t.name]] == 0.0)
    assert pruner._gradient_mask is None


def test_a_new_optimizer_or_close_moves_or_removes_the_hook() -> None:
    model, pruner, opt = train(OPTIMIZERS["sgd-nesterov"], steps=6)
    assert len(opt._optimizer_step_pre_hooks) == 1
    pruner.optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner.step()
    assert len(opt._optimizer_step_pre_hooks) == 0
    assert len(pruner.optimizer._optimizer_step_pre_hooks) == 1
    pruner.close()
    assert len(pruner.optimizer._optimizer_step_pre_hooks) == 0


def test_elementwise_optimizers_are_torch_classes() -> None:
    assert torch.optim.LBFGS not in ELEMENTWISE_OPTIMIZERS
    assert all(issubclass(c, torch.optim.Optimizer) for c in ELEMENTWISE_OPTIMIZERS)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_masked_equals_torch_where_bit_for_bit(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=g) * 3
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    x[1, :4] = x[0, :4]
    x = x.to(dtype)
    mask = torch.rand(7, 33, generator=g) < 0.5
    mask[0, :4], mask[1, :4] = False, True
    expected = torch.where(mask, x, torch.zeros((), dtype=dtype))
    strided = x.t().clone().t()  # non-contiguous views work too
    zero_masked_(x, mask)
    zero_masked_(strided, mask)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    assert torch.equal(x.view(width), expected.view(width))
    assert torch.equal(strided.contiguous().view(width), expected.view(width))
