"""Criteria that look at the weights alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import validation as check
from ..schedules import Schedule, as_schedule
from ..selection import Threshold
from ..targets import Target
from .base import Criterion, register_criterion


@register_criterion("magnitude")
class Magnitude(Criterion):
    """``score = |w|`` (Han et al. 2015; Zhu & Gupta 2017)."""

    def score(self, target: Target) -> torch.Tensor:
        return target.param.detach().abs()


@register_criterion("random")
class Random(Criterion):
    """Uniform random scores: the baseline every other criterion must beat.

    Args:
        seed: Seed of the criterion's own generator; its state is checkpointed, so a resumed
            run draws the same scores as an uninterrupted one.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = check.integer("seed", seed, low=0)
        self._gen = torch.Generator().manual_seed(seed)

    def score(self, target: Target) -> torch.Tensor:
        p = target.param
        return torch.rand(p.shape, generator=self._gen).to(p.device)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._gen.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"Random(seed={self.seed})"


@register_criterion("clipping")
@dataclass(repr=True)
class Clipping(Criterion):
    """Dynamic weight clipping: ``|w| < threshold`` is zeroed at every update, and may come back.

    Splicing (Guo et al. 2016, "Dynamic Network Surgery") with two thresholds: a kept weight
    is pruned when ``|w| < threshold``; a pruned weight returns when ``|w| >= threshold *
    (1 + margin)``; in between, a weight keeps its state (hysteresis, so masks do not
    flicker). As in the paper, pruned weights keep training behind their mask: the pruner
    accumulates each step's update of a pruned weight (one float buffer per target, 4 bytes
    per weight, only for criteria that regrow), leaves optimizer state unmasked, and a
    pruned weight whose accumulated value crosses the upper threshold returns with it.

    Args:
        threshold: A constant or a schedule of the step. ``None`` derives it from the
            pruner's target sparsity at each update (the score quantile of that sparsity,
            in the pruner's scope), which gives the exact sparsity and lets weights swap.
        margin: Relative gap between the pruning and the regrowth thresholds, ``>= 0``.
    """

    threshold: float | Schedule | None = None
    margin: float = 0.1

    regrows = True

    def __post_init__(self) -> None:
        self.margin = check.number("margin", self.margin, low=0.0)
        if self.threshold is not None:
            if not isinstance(self.threshold, Schedule):
                self.threshold = check.number("threshold", self.threshold, low=0.0)
            low, _ = as_schedule(self.threshold).bounds()
            if not low >= 0:
                raise ValueError(f"threshold must be >= 0 at every step, got {self.threshold!r}")

    def score(self, target: Target) -> torch.Tensor:
        return target.param.detach().abs()

    @property
    def policy(self) -> Threshold | None:
        """Selection by :attr:`threshold` with hysteresis, or ``None`` (by count) when the
        threshold is derived from the pruner's sparsity."""
        return None if self.threshold is None else Threshold(self.threshold, self.margin)

    def thresholds(self, step: int) -> tuple[float, float] | None:
        """``(prune_below, regrow_at_or_above)`` at ``step``, or ``None`` when derived."""
        policy = self.policy
        return None if policy is None else policy.bounds(step)
