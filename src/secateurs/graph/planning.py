"""Channel plans: which channel groups a pruner's targets produce, and their masks.

A :class:`ChannelPlan` is what the pruner asks the graph for when ``granularity`` is
``channel`` with example inputs: the groups whose output channels its targets hold, the
coupled parameters that are not targets (their masks follow the groups), a per-group target
sparsity, and the masks of every coupled parameter from one keep vector per group. The
pruner scores units (with its criterion) and selects them (with
:mod:`secateurs.selection`); the plan turns keep vectors into masks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..targets import Target
from .groups import ChannelGroup, Structure, discover

__all__ = ["ChannelPlan", "plan_channels"]


@dataclass
class ChannelPlan:
    """The channel groups produced by a set of targets.

    Attributes:
        structure: Every channel group of the model.
        groups: Group name -> the group, for each group some target produces and that can
            be pruned.
        producers: Group name -> the target names that hold its output channels.
        coupled: Coupled parameters that are not targets, in the order found.
    """

    structure: Structure
    groups: dict[str, ChannelGroup] = field(default_factory=dict)
    producers: dict[str, list[str]] = field(default_factory=dict)
    coupled: list[Target] = field(default_factory=list)

    @property
    def params(self) -> set[str]:
        """Every parameter some planned group covers."""
        return {p for g in self.groups.values() for p in g.params}

    def reduce(self, element: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Group name -> one score per unit: element scores summed over each unit's slices."""
        return {name: g.reduce(element) for name, g in self.groups.items()}

    def unit_sparsity(self, sparsity: Mapping[str, float]) -> dict[str, float]:
        """Group name -> target sparsity: the largest of its producing targets'."""
        return {name: max(sparsity[t] for t in produced)
                for name, produced in self.producers.items()}

    def off(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Group name -> the units that ``masks`` switch off entirely."""
        return {name: g.off(masks) for name, g in self.groups.items()}

    def masks(self, keeps: Mapping[str, torch.Tensor],
              like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masks of every parameter in ``like`` from group name -> unit keep vector; a
        parameter no group covers is kept whole."""
        masks = self.structure.masks(keeps)
        return {name: masks[name] if name in masks else torch.ones_like(like[name])
                for name in like}


def plan_channels(model: nn.Module, targets: Sequence[Target], example_inputs: Any
                  ) -> ChannelPlan:
    """Trace ``model`` and plan the channel groups whose output channels ``targets`` hold.

    Raises:
        ValueError: if the model cannot be traced, a target's channel coupling cannot be
            resolved safely (naming it), or no target has output channels that can go.
    """
    plan = ChannelPlan(discover(model, example_inputs))
    names = [t.name for t in targets]
    for g in plan.structure.groups:
        produced = [n for n in names if g.produces(n)]
        if produced and g.error is not None:
            raise ValueError(f"cannot prune the output channels of {produced}: {g.error}")
        if produced and g.fixed is None:
            plan.groups[g.name] = g
            plan.producers[g.name] = produced
    if not plan.groups:
        reasons = "; ".join(f"{g.name}: {g.fixed}" for g in plan.structure.groups
                            if g.fixed and any(g.produces(n) for n in names))
        raise ValueError(f"no target has output channels that can be removed ({reasons})")
    known = set(names)
    coupled: dict[str, Target] = {}
    for g in plan.groups.values():
        for s in g.slices:
            if s.param not in known and s.param not in coupled:
                module = model.get_submodule(s.module)
                param_name = s.param[len(s.module) + 1:] if s.module else s.param
                coupled[s.param] = Target(s.param, s.module, module, param_name)
    plan.coupled = list(coupled.values())
    return plan
