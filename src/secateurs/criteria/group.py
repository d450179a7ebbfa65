"""Group criteria: one score per unit of a channel group, over every coupled parameter.

Registered in the criteria registry beside the element criteria, so the pruner takes them
by name. A :class:`~secateurs.criteria.GroupCriterion` scores channel groups itself; any
other criterion (``magnitude``, ``contribution``, ``taylor``, ...) is reduced
by :meth:`~secateurs.graph.ChannelGroup.reduce`: its element scores summed over
each unit's slices of the targets. ``contribution`` then weighs a channel by the inputs its
consumers see (``||x_c|| * sum_i |w_ic|``) as well as by its filter, which makes it the
activation-aware group score; ``taylor`` sums ``|w * dL/dw|`` over the group (Molchanov et
al. 2019, "Importance Estimation for Neural Network Pruning").
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph import ChannelGroup
from ..targets import Target
from .base import GroupCriterion, register_criterion

__all__ = ["BNScale", "GroupL1", "GroupL2", "bn_penalty"]


def _params(group: ChannelGroup, model: nn.Module) -> dict[str, torch.Tensor]:
    return {p: model.get_parameter(p).detach() for p in group.params}


@register_criterion("l1")
class GroupL1(GroupCriterion):
    """Group L1 norm: ``sum |w|`` over every coupled slice of a unit.

    The filter-norm criterion of Li et al. 2017 ("Pruning Filters for Efficient ConvNets")
    taken over the whole group, as Torch-Pruning's ``GroupMagnitudeImportance`` does: the
    filter, its bias, its BatchNorm scale and shift, and the input columns of the layers
    that read the channel. With ``granularity="element"`` it is ``|w|``.
    """

    def score(self, target: Target) -> torch.Tensor:
        return target.param.detach().abs()

    def score_group(self, group: ChannelGroup, model: nn.Module) -> torch.Tensor:
        """One ``sum |w|`` per unit of ``group``."""
        return group.reduce({p: w.abs() for p, w in _params(group, model).items()})


@register_criterion("l2")
class GroupL2(GroupCriterion):
    """Group L2 norm: ``sqrt(sum w^2)`` over every coupled slice of a unit.

    With ``granularity="element"`` the score is ``w^2``, which ranks as ``|w|`` does and
    sums to the squared row norm for per-target channels.
    """

    def score(self, target: Target) -> torch.Tensor:
        return target.param.detach().square()

    def score_group(self, group: ChannelGroup, model: nn.Module) -> torch.Tensor:
        """One ``sqrt(sum w^2)`` per unit of ``group``."""
        return group.reduce({p: w.square() for p, w in _params(group, model).items()}).sqrt()


@register_criterion("bn_scale")
class BNScale(GroupCriterion):
    """Network slimming: a channel's BatchNorm scale ``|gamma|`` (Liu et al. 2017,
    "Learning Efficient Convolutional Networks through Network Slimming").

    Summed over the BatchNorm layers of a group (a residual stage has several). Train with
    :func:`bn_penalty` added to the loss to push unneeded scales towards zero. Scores whole
    channel groups only: use ``granularity="channel"`` with ``example_inputs`` (a
    :class:`~secateurs.Pruner` refuses any other granularity when it is built).
    """

    def score(self, target: Target) -> torch.Tensor:
        raise TypeError("criterion 'bn_scale' scores whole channel groups; use "
                        "granularity='channel' with example_inputs")

    def score_group(self, group: ChannelGroup, model: nn.Module) -> torch.Tensor:
        """One ``sum |gamma|`` per unit of ``group``.

        Raises:
            ValueError: if no BatchNorm layer in the group has a scale.
        """
        return group.reduce(self.scales(group, model))

    def scales(self, group: ChannelGroup, model: nn.Module) -> dict[str, torch.Tensor]:
        """Parameter name -> ``|gamma|`` of every BatchNorm scale in ``group`` (a Pruner
        calls this once per group when it is built, so a group without one is refused
        before training, not at the first mask update).

        Raises:
            ValueError: if no BatchNorm layer in the group has a scale.
        """
        scales = {s.param: model.get_parameter(s.param).detach().abs() for s in group.slices
                  if s.param.endswith("weight")
                  and isinstance(model.get_submodule(s.module), nn.modules.batchnorm._BatchNorm)}
        if not scales:
            raise ValueError(f"criterion 'bn_scale' needs a BatchNorm with a scale in every "
                             f"pruned channel group; the group of {group.name!r} has none "
                             "(choose targets whose channels pass through BatchNorm, or 'l1')")
        return scales


def bn_penalty(model: nn.Module) -> torch.Tensor:
    """``sum |gamma|`` over every BatchNorm scale: the sparsity penalty of network slimming,
    added to the loss as ``loss + strength * bn_penalty(model)`` (``strength ~ 1e-4``)."""
    terms = [m.weight.abs().sum() for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    if not terms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with a scale")
    return torch.stack(terms).sum()
