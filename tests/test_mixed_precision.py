"""Mixed precision on a CPU: bf16 and fp16 parameters, autocast over fp32 parameters, and a
gradient scaler. Masks stay ``torch.bool``; masked weights and optimizer state are exactly
zero; the masked-gradient path trains exactly as zeroing everything at every step."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch
from torch import nn

from conftest import reference
from secateurs import Pruner
from secateurs.schedules import Cubic

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Factory] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    # eps 1e-8 underflows in fp16 (a zero second moment then divides by zero)
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, eps=1e-4),
}


def train(factory: Factory, dtype: torch.dtype = torch.float32,
          autocast: torch.dtype | None = None, scaler: bool = False, steps: int = 14
          ) -> tuple[nn.Module, Pruner, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
    opt = factory(list(model.parameters()))
    pruner = Pruner(model, Cubic(0.0, 0.75, begin_step=2, end_step=10), update_every=2,
                    optimizer=opt)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g).to(dtype)
        y = torch.randint(0, 4, (8,), generator=g)
        context: AbstractContextManager[object] = nullcontext() if autocast is None else \
            torch.autocast("cpu", dtype=autocast)
        opt.zero_grad()
        with context:
            loss = nn.functional.cross_entropy(model(x), y)
        if grad_scaler is None:
            loss.backward()
            opt.step()
        else:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(opt)
            grad_scaler.update()
        pruner.step()
    return model, pruner, opt


CASES = {
    "bf16-parameters": {"dtype": torch.bfloat16},
    "fp16-parameters": {"dtype": torch.float16},
    "bf16-autocast": {"autocast": torch.bfloat16},
    "fp16-autocast-scaler": {"autocast": torch.float16, "scaler": True},
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES))
def test_masked_weights_and_state_are_exactly_zero(case: str, optimizer: str) -> None:
    kwargs = CASES[case]
    model, pruner, opt = train(OPTIMIZERS[optimizer], **kwargs)  # type: ignore[arg-type]
    assert pruner.sparsity() == pytest.approx(0.75, abs=0.01)
    for t in pruner.targets:
        mask = pruner.masks[t.name]
        assert mask.dtype == torch.bool
        assert t.param.dtype == kwargs.get("dtype", torch.float32)
        assert torch.all(t.param[~mask] == 0.0)
        for value in opt.state[t.param].values():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                assert torch.all(value[~mask] == 0.0)
    ref_model, ref_pruner, _ = train(reference(OPTIMIZERS[optimizer]),
                                     **kwargs)  # type: ignore[arg-type]
    for (k, a), b in zip(model.state_dict().items(), ref_model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], ref_pruner.masks[name])
