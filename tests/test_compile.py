"""``torch.compile``: masks stay enforced on a compiled model, whether the pruner is built on
the original module or on the compiled one, and mask updates cause no recompilation.

The backend is ``aot_eager`` behind a frame counter: the graphs go through AOTAutograd
(the compiled backward produces the gradients that the masking zeroes) without the C++
compiler, so the tests take seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import secateurs as sc
from secateurs import Pruner
from secateurs.schedules import Cubic

STEPS = 16


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model: nn.Module, forward: nn.Module, opt: torch.optim.Optimizer, pruner: Pruner,
          counter: CompileCounterWithBackend | None = None) -> list[int]:
    """Train ``STEPS`` steps through ``forward``; the compiled frames after each step."""
    g = torch.Generator().manual_seed(1)
    frames = []
    for _ in range(STEPS):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
        pruner.step()
        for t in pruner.targets:  # enforced at every step, mask updates included
            mask = pruner.masks[t.name]
            assert torch.all(t.param[~mask] == 0.0), t.name
            assert torch.all(opt.state[t.param]["exp_avg"][~mask] == 0.0), t.name
        frames.append(0 if counter is None else counter.frame_count)
    return frames


def schedule() -> Cubic:
    return Cubic(0.0, 0.8, begin_step=0, end_step=10)  # five mask updates


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_pruner_on_the_original_module_keeps_a_compiled_model_pruned(fullgraph: bool) -> None:
    model, opt = build()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=fullgraph)
    pruner = Pruner(model, schedule(), update_every=2, optimizer=opt)
    frames = train(model, compiled, opt, pruner, counter)
    assert pruner.sparsity() == pytest.approx(0.8, abs=0.01)
    assert frames[-1] == frames[0] == 1, f"recompiled: frames per step {frames}"

    eager, eager_opt = build()
    eager_pruner = Pruner(eager, schedule(), update_every=2, optimizer=eager_opt)
    train(eager, eager, eager_opt, eager_pruner)
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], eager_pruner.masks[name]), name
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_a_pruner_on_the_compiled_module_prunes_its_parameters() -> None:
    model, opt = build()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    pruner = Pruner(compiled, schedule(), update_every=2, optimizer=opt)
    # The module it wraps is pruned: its names, without torch.compile's "_orig_mod." prefix.
    assert pruner.model is model
    assert [t.name for t in pruner.targets] == ["0.weight", "2.weight", "4.weight"]
    frames = train(model, compiled, opt, pruner, counter)
    assert pruner.sparsity() == pytest.approx(0.8, abs=0.01)
    assert frames[-1] == frames[0] == 1, f"recompiled: frames per step {frames}"
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias",
                                        "4.weight", "4.bias"]


def test_a_checkpoint_of_a_compiled_model_loads_into_the_eager_one(tmp_path: Path) -> None:
    model, opt = build()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    pruner = Pruner(compiled, schedule(), update_every=2, optimizer=opt)
    train(model, compiled, opt, pruner, counter)
    sc.save(tmp_path / "c.safetensors", compiled, pruner, opt)
    eager, eager_opt = build()
    eager_pruner = Pruner(eager, schedule(), update_every=2, optimizer=eager_opt)
    sc.load(tmp_path / "c.safetensors", eager, eager_pruner, eager_opt)
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], eager_pruner.masks[name]), name
    assert eager_pruner.step_count == pruner.step_count
    sc.load(tmp_path / "c.safetensors", torch.compile(eager, backend=counter), eager_pruner)
