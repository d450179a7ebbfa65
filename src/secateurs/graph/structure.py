"""The records of channel coupling: parameter slices, handler calls, and channel groups.

A *channel group* is every parameter slice that one output channel (a filter, a neuron,
a head's dimension) reaches; channels that can only go together form one *unit*.
:mod:`.groups` finds the groups of a model, :mod:`.blocks` builds those of known
transformer blocks directly; both describe them with the records here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ChannelGroup", "Heads", "Op", "Resize", "Slice", "Structure"]


@dataclass(frozen=True)
class Slice:
    """Positions ``index`` along ``dim`` of parameter ``param``; ``channel[i]`` is the group
    channel that position ``index[i]`` belongs to. ``role`` is ``"in"`` for the input
    columns of a consuming layer, ``"out"`` for everything that produces the channel."""

    module: str
    param: str
    dim: int
    index: torch.Tensor
    channel: torch.Tensor
    role: str


@dataclass(frozen=True)
class Op:
    """One Torch-Pruning handler call that compaction makes: ``handler(module, indices)``."""

    module: str
    handler: Callable[..., Any]
    pruning_dim: int
    index: torch.Tensor
    channel: torch.Tensor


@dataclass(frozen=True)
class Heads:
    """An attention module whose projections hold ``head_dim`` channels per head; compaction
    sets ``attribute`` (e.g. ``num_heads``) to the heads that remain."""

    module: str
    attribute: str
    head_dim: int
    projection: str


@dataclass(frozen=True)
class Resize:
    """A size attribute that follows a layer's width: after compaction, ``attribute`` of
    ``module`` becomes the output width of layer ``source`` divided by ``per`` (the heads
    of a fused q/k/v projection are its width over ``3 * head_dim``).

    With ``config``, the attribute is one of the model's configuration (e.g.
    ``num_key_value_heads``), found on ``module`` or the nearest module above it that has a
    ``config``; it is set only when every layer agrees on its value. A ``value`` sets the
    attribute to that constant instead (a ``head_dim`` that the configuration derived
    from the head count, pinned before the count changes).
    """

    module: str
    attribute: str
    source: str
    per: int = 1
    config: bool = False
    value: int | None = None

    def size(self, source: int) -> int:
        """The attribute's value for a ``source`` layer ``source`` outputs wide."""
        return self.value if self.value is not None else source // self.per


@dataclass
class ChannelGroup:
    """Every parameter slice coupled to the output channels of one root layer.

    Attributes:
        name: The root layer, e.g. ``layer1.0.conv1``.
        channels: Channels of the root layer.
        unit_of: Channel -> unit (units are what selection keeps or removes).
        slices: Parameter slices, for masks and scores.
        ops: Torch-Pruning handler calls, for compaction.
        heads: Attention modules whose head count follows this group.
        resizes: Other size attributes (and configuration entries) that follow it.
        fixed: Why the channels must stay (model outputs, normalised widths), or ``None``.
        error: Why the coupling cannot be resolved safely, or ``None``.
    """

    name: str
    channels: int
    unit_of: torch.Tensor
    slices: tuple[Slice, ...]
    ops: tuple[Op, ...]
    heads: tuple[Heads, ...] = ()
    fixed: str | None = None
    error: str | None = None
    resizes: tuple[Resize, ...] = ()

    @property
    def units(self) -> int:
        """Number of units (channels, or heads, or channel sets of a grouped convolution)."""
        return int(self.unit_of.max()) + 1 if self.channels else 0

    @property
    def prunable(self) -> bool:
        return self.fixed is None and self.error is None

    @property
    def params(self) -> list[str]:
        """Coupled parameter names, in order of first appearance."""
        return list(dict.fromkeys(s.param for s in self.slices))

    def produces(self, param: str) -> bool:
        """Whether ``param`` holds the output channels of this group (not only inputs)."""
        return any(s.param == param and s.role == "out" for s in self.slices)

    def reduce(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum element scores over each unit's slices: one value per unit.

        Args:
            scores: Parameter name -> element scores shaped like it; parameters missing
                here are left out of the sums.
        """
        out = torch.zeros(self.channels, dtype=torch.float64)
        for s in self.slices:
            if s.param not in scores:
                continue
            per = scores[s.param].detach().double().movedim(s.dim, 0)
            per = per.reshape(per.shape[0], -1).sum(1).cpu()
            # A position shared by channels of one unit counts once in that unit.
            shared = torch.bincount(s.index, minlength=per.shape[0]).clamp_min(1)
            out.index_add_(0, s.channel, per[s.index] / shared[s.index])
        return torch.zeros(self.units, dtype=torch.float64).index_add_(0, self.unit_of, out)

    def keep_masks(self, keep: torch.Tensor, shapes: Mapping[str, torch.Size]
                   ) -> dict[str, torch.Tensor]:
        """Bool masks of the coupled parameters with the units where ``keep`` is False
        removed everywhere (``True`` = kept)."""
        channel_keep = keep.cpu()[self.unit_of]
        masks: dict[str, torch.Tensor] = {}
        for s in self.slices:
            gone = s.index[~channel_keep[s.channel]]
            if gone.numel() == 0:
                continue
            shape = shapes[s.param]
            line = torch.ones(shape[s.dim], dtype=torch.bool)
            line[gone] = False
            view = [1] * len(shape)
            view[s.dim] = -1
            mask = line.view(view).expand(shape)
            masks[s.param] = mask & masks[s.param] if s.param in masks else mask
        return masks

    def off(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Units that ``masks`` switch off entirely: every covered slice of the units'
        producers is masked, or every covered input slice of their consumers is."""
        covered = {"out": torch.zeros(self.channels), "in": torch.zeros(self.channels)}
        alive = {"out": torch.zeros(self.channels), "in": torch.zeros(self.channels)}
        for s in self.slices:
            if s.param not in masks:
                continue
            m = masks[s.param].movedim(s.dim, 0)
            live = m.reshape(m.shape[0], -1).any(1).cpu()[s.index]
            covered[s.role].index_add_(0, s.channel, torch.ones(len(s.channel)))
            alive[s.role].index_add_(0, s.channel, live.float())
        dead = torch.zeros(self.channels, dtype=torch.bool)
        for role in ("out", "in"):
            dead |= (covered[role] > 0) & (alive[role] == 0)
        # A unit goes only if all its channels do.
        live_units = torch.zeros(self.units).index_add_(0, self.unit_of, (~dead).float())
        return live_units == 0


@dataclass
class Structure:
    """All channel groups of a model, and the shapes of the parameters they couple."""

    groups: list[ChannelGroup]
    shapes: dict[str, torch.Size] = field(default_factory=dict)

    def producer_of(self, param: str) -> ChannelGroup | None:
        """The group whose output channels ``param`` holds, if any."""
        return next((g for g in self.groups if g.produces(param)), None)

    def masks(self, keeps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Group name -> unit keep vector, to bool masks of every coupled parameter."""
        out: dict[str, torch.Tensor] = {}
        by_name = {g.name: g for g in self.groups}
        for name, keep in keeps.items():
            for param, mask in by_name[name].keep_masks(keep, self.shapes).items():
                out[param] = mask & out[param] if param in out else mask
        return {p: m.clone() for p, m in out.items()}
