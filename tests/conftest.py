from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import settings
from torch import nn

settings.register_profile("ci", max_examples=30, deadline=None)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class SmallCNN(nn.Module):
    """Conv -> conv -> linear -> linear, on 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(),
                                  nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int,
                after_step=None, seed: int = 0, in_shape=(16,), classes: int = 4) -> None:
    """A few deterministic steps on synthetic data; ``after_step`` runs after each step."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, *in_shape, generator=g)
        y = torch.randint(0, classes, (8,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if after_step is not None:
            after_step()


Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def reference(factory: Factory) -> Factory:
    """The same optimizer under a type of its own, which the pruner does not know as
    element-wise: it then zeroes weights and state at every step, the reference that the
    gradient-masking path must equal bit for bit."""
    def build(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        opt = factory(params)
        opt.__class__ = type(f"Reference{type(opt).__name__}", (type(opt),), {})
        return opt
    return build
