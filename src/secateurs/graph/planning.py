"""Channel plans: which channel groups a pruner's targets produce, and their masks.

A :class:`ChannelPlan` is what the pruner asks the graph for when ``granularity`` is
``channel`` with example inputs: the groups whose output channels its targets hold, the
coupled parameters that are not targets (their masks follow the groups), a per-group target
sparsity, and the masks of every coupled parameter from one keep vector per group. The
pruner scores units (with its criterion) and selects them (with
:mod:`secateurs.selection`); the plan turns keep vectors into masks.

Targets whose channels cannot go stay at full width, each with the reason
(:class:`KeptGroup`): channels that are model outputs or normalised over their whole width
are kept by design; a coupling that cannot be resolved safely (a parameter used outside
known layers, a recurrent layer) is kept too, so one such group does not stop the rest of
the model from being pruned, unless the plan is ``strict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..targets import Target
from .groups import ChannelGroup, Structure, discover

__all__ = ["ChannelPlan", "KeptGroup", "plan_channels"]


@dataclass(frozen=True)
class KeptGroup:
    """Targets whose output channels stay at full width, and why.

    Attributes:
        group: The channel group holding their output channels (its root layer), or
            ``None`` when no group holds them.
        targets: The targets it covers, in target order.
        reason: Why their channels stay; never empty.
        resolved: ``False`` when the coupling could not be resolved safely (rather than
            kept by design, as model outputs are): a strict plan refuses these.
    """

    group: str | None
    targets: tuple[str, ...]
    reason: str
    resolved: bool


@dataclass
class ChannelPlan:
    """The channel groups produced by a set of targets.

    Attributes:
        structure: Every channel group of the model.
        groups: Group name -> the group, for each group some target produces and that can
            be pruned.
        producers: Group name -> the target names that hold its output channels.
        coupled: Coupled parameters that are not targets, in the order found.
        kept: The targets whose output channels stay at full width, with the reasons.
    """

    structure: Structure
    groups: dict[str, ChannelGroup] = field(default_factory=dict)
    producers: dict[str, list[str]] = field(default_factory=dict)
    coupled: list[Target] = field(default_factory=list)
    kept: list[KeptGroup] = field(default_factory=list)

    @property
    def params(self) -> set[str]:
        """Every parameter some planned group covers."""
        return {p for g in self.groups.values() for p in g.params}

    @property
    def kept_targets(self) -> dict[str, str]:
        """Target name -> why its output channels stay at full width."""
        return {t: k.reason for k in self.kept for t in k.targets}

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


def plan_channels(model: nn.Module, targets: Sequence[Target], example_inputs: Any, *,
                  strict: bool = False) -> ChannelPlan:
    """Trace ``model`` and plan the channel groups whose output channels ``targets`` hold.

    Every group some target produces and that can be pruned is planned; the other targets
    keep their channels, each recorded in :attr:`ChannelPlan.kept` with the reason.

    Args:
        model: The model (traced on a copy; it is not changed).
        targets: The pruner's targets.
        example_inputs: Inputs the model can be called on.
        strict: Refuse targets whose channel coupling cannot be resolved safely, instead of
            keeping their channels.

    Raises:
        ValueError: if the model cannot be traced, ``strict`` and a target's channel
            coupling cannot be resolved (naming the targets and the reason), or no target
            has output channels that can go (listing every reason).
    """
    plan = ChannelPlan(discover(model, example_inputs))
    names = [t.name for t in targets]
    recurrent = _recurrent(model)
    placed: set[str] = set()
    for g in plan.structure.groups:
        produced = [n for n in names if g.produces(n)]
        if not produced:
            continue
        placed.update(produced)
        if g.prunable:
            plan.groups[g.name] = g
            plan.producers[g.name] = produced
        else:
            plan.kept.append(_kept_group(g, produced, recurrent))
    plan.kept += _unplaced(plan.structure, [t for t in targets if t.name not in placed],
                           recurrent)
    rank = {n: i for i, n in enumerate(names)}
    plan.kept.sort(key=lambda k: rank[k.targets[0]])
    refused = [k for k in plan.kept if not k.resolved]
    if strict and refused:
        raise ValueError("; ".join(f"cannot prune the output channels of {held}: {reason}"
                                   for reason, held in _by_reason(refused).items())
                         + " (strict=True; with strict=False these keep their channels and "
                         "the other targets are pruned)")
    if not plan.groups:
        reasons = [f"{', '.join(held)}: {reason}"
                   for reason, held in _by_reason(plan.kept).items()]
        reasons += [r for r in recurrent.values() if all(r not in k.reason for k in plan.kept)]
        raise ValueError(f"no target has output channels that can be removed "
                         f"({'; '.join(reasons)})")
    plan.coupled = _coupled(model, plan, set(names))
    return plan


def _by_reason(kept: Sequence[KeptGroup]) -> dict[str, list[str]]:
    """Reason -> the targets kept for it, in order."""
    out: dict[str, list[str]] = {}
    for k in kept:
        out.setdefault(k.reason, []).extend(k.targets)
    return out


def _recurrent(model: nn.Module) -> dict[str, str]:
    """Module name -> why channel pruning cannot touch it, for each recurrent layer."""
    return {name: (f"recurrent layers (nn.{type(m).__name__} {name!r}) are not supported for "
                   "channel pruning: their gates couple units across time; prune their "
                   "weights with granularity 'element' or 'N:M', or exclude them")
            for name, m in model.named_modules() if isinstance(m, nn.RNNBase)}


def _kept_group(g: ChannelGroup, produced: list[str], recurrent: Mapping[str, str]
                ) -> KeptGroup:
    """Why the channels of group ``g`` stay: a recurrent layer it reaches, the coupling it
    cannot resolve, then what fixes them by design."""
    text = f"{g.error or ''} {g.fixed or ''}"
    layers = {op.module for op in g.ops} | {s.module for s in g.slices}
    rnn = next((r for name, r in recurrent.items()
                if name in layers or f"'{name}'" in text or f"'{name}." in text), None)
    if rnn is not None:
        return KeptGroup(g.name, tuple(produced), rnn, False)
    error = g.error
    if error is not None and not g.ops and recurrent:
        # Torch-Pruning gave up before naming the layers it reached; recurrent ones are the
        # usual cause.
        error = f"{error}, most likely because {'; '.join(recurrent.values())}"
    reason = "; ".join(r for r in (error, g.fixed) if r) or \
        f"the channels of {g.name!r} cannot be removed"
    return KeptGroup(g.name, tuple(produced), reason, g.error is None)


def _unplaced(structure: Structure, targets: Sequence[Target], recurrent: Mapping[str, str]
              ) -> list[KeptGroup]:
    """Targets that hold the output channels of no group, each with the reason."""
    traced = {s.module for g in structure.groups for s in g.slices} | \
        {op.module for g in structure.groups for op in g.ops}
    rooted = {g.name: g for g in structure.groups}
    kept = []
    for t in targets:
        kind = type(t.module).__name__
        if t.module_name in rooted and not rooted[t.module_name].slices:
            # Its group failed before finding any slice (its own among them).
            kept.append(_kept_group(rooted[t.module_name], [t.name], recurrent))
            continue
        if t.module_name in recurrent:
            reason, resolved = recurrent[t.module_name], False
        elif t.module_name in traced:
            reason, resolved = (f"{t.param_name!r} of {kind} {t.module_name!r} holds no output "
                                "channels of a channel group (it only follows others)"), True
        else:
            reason, resolved = (f"{kind} {t.module_name!r} is not one whose output channels "
                                "can be removed, or the example inputs do not reach it"), True
        kept.append(KeptGroup(None, (t.name,), reason, resolved))
    return kept


def _coupled(model: nn.Module, plan: ChannelPlan, known: set[str]) -> list[Target]:
    """Coupled parameters of the planned groups that are not targets, in the order found."""
    coupled: dict[str, Target] = {}
    for g in plan.groups.values():
        for s in g.slices:
            if s.param not in known and s.param not in coupled:
                module = model.get_submodule(s.module)
                param_name = s.param[len(s.module) + 1:] if s.module else s.param
                coupled[s.param] = Target(s.param, s.module, module, param_name)
    return list(coupled.values())
