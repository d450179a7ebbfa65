"""Channel groups: which parameter slices must be removed together, found by Torch-Pruning.

A *channel group* is every parameter slice that one output channel (a filter, a neuron,
a head's dimension) reaches: the producing filter and its bias, the BatchNorm scale and
shift after it, the matching input columns of every layer that reads it, and the same for
every layer coupled to it by a residual addition, a concatenation or a depthwise
convolution. Torch-Pruning's ``DependencyGraph`` (Fang et al. 2023, "DepGraph") traces
the coupling; :mod:`.slicing` turns each coupled handler into parameter slices.

Channels that can only go together form one *unit*: the channels of one attention head,
or the same channel of every group of a grouped convolution. Selection ranks units.

This module sits low in the layers (it imports only torch and torch_pruning), so the
pruner can build group-aware masks with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .slicing import INEXACT, SLICERS, Cut

__all__ = ["ChannelGroup", "Heads", "Op", "Slice", "Structure", "bare_copy", "discover", "forward"]

#: Names of the query, key and value projections of an attention module with heads.
QKV_NAMES = frozenset({"q", "k", "v", "query", "key", "value", "q_proj", "k_proj", "v_proj",
                       "to_q", "to_k", "to_v", "wq", "wk", "wv"})
#: Attributes holding the number of heads, in the order they are looked up.
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads")
_ROOTS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)


def forward(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on example inputs: ``model(**x)`` for a mapping, ``model(*x)`` for a
    tuple or list, ``model(x)`` otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


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


def discover(model: nn.Module, example_inputs: Any, *, in_place: bool = False) -> Structure:
    """Trace ``model`` on ``example_inputs`` and return its channel groups.

    The trace runs on a copy (with its hooks removed), so the model, its mode and any
    statistics hooks are left alone, unless ``in_place`` (for a copy made by the caller).

    Raises:
        ValueError: if the model cannot be traced with ``example_inputs``.
    """
    traced = model if in_place else bare_copy(model)
    for p in traced.parameters():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                traced, example_inputs, forward_fn=forward, verbose=False)
    except Exception as exc:
        raise ValueError(f"Torch-Pruning could not trace {type(model).__name__} with the "
                         f"example inputs: {type(exc).__name__}: {exc}") from exc
    names = {m: n for n, m in traced.named_modules()}
    heads = _find_heads(traced)
    groups: list[ChannelGroup] = []
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if isinstance(module, _ROOTS) and module not in visited:
            group, producers = _group(graph, module, names, heads)
            visited.update(producers)
            groups.append(group)
    _check_heads(groups)
    _check_shared(groups)
    shapes = {n: p.shape for n, p in traced.named_parameters()}
    return Structure(groups, shapes)


def bare_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its forward and backward hooks removed."""
    clone = copy.deepcopy(model)
    for m in clone.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._backward_hooks.clear()
    return clone


def _fqn(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


class _Builder:
    """Collects the slices, ops and ties of one group from Torch-Pruning's group items."""

    def __init__(self, root: str, channels: int) -> None:
        self.root, self.channels = root, channels
        self.slices: list[Slice] = []
        self.ops: list[Op] = []
        self.ties: list[tuple[tuple[Any, ...], torch.Tensor, torch.Tensor]] = []
        self.heads: dict[str, Heads] = {}
        self.fixed: str | None = None
        self.error: str | None = None

    def add(self, layer: str, module: nn.Module, owner: Any, out: bool, index: torch.Tensor,
            channel: torch.Tensor) -> None:
        if type(owner) in INEXACT:
            self.fixed = self.fixed or INEXACT[type(owner)].format(layer=layer)
            return
        slicer = SLICERS.get(type(owner))
        if slicer is None:
            self.error = self.error or (f"layer {layer!r} ({type(module).__name__}) has no "
                                        "slicing rule for its channels")
            return
        try:
            cuts: list[Cut] = slicer(module, out, index)
        except ValueError as exc:
            self.error = self.error or f"layer {layer!r}: {exc}"
            return
        role = "out" if out else "in"
        for cut in cuts:
            self.slices.append(Slice(layer, _fqn(layer, cut.param_name), cut.dim, cut.index,
                                     channel, role))
            if cut.tie is not None:
                self.ties.append((("group", layer, role), cut.tie, channel))

    def unit_of(self) -> torch.Tensor:
        """Union-find over channels: positions shared by channels, and explicit ties."""
        parent = list(range(self.channels))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        keyed = list(self.ties)
        for s in self.slices:
            if s.index.unique().numel() < s.index.numel():
                keyed.append((("cell", s.param, s.dim), s.index, s.channel))
        for key, values, channels in keyed:
            first: dict[tuple[Any, ...], int] = {}
            for v, c in zip(values.tolist(), channels.tolist(), strict=True):
                a, b = find(first.setdefault((*key, v), c)), find(c)
                parent[max(a, b)] = min(a, b)
        roots = torch.tensor([find(c) for c in range(self.channels)], dtype=torch.long)
        return torch.unique(roots, return_inverse=True)[1]

    def build(self) -> ChannelGroup:
        return ChannelGroup(self.root, self.channels, self.unit_of(), tuple(self.slices),
                            tuple(self.ops), tuple(self.heads.values()), self.fixed,
                            self.error)


def _group(graph: tp.DependencyGraph, root: nn.Module, names: Mapping[nn.Module, str],
           heads: Mapping[str, Heads]) -> tuple[ChannelGroup, set[nn.Module]]:
    """The channel group rooted at the output channels of ``root``."""
    pruner = graph.get_pruner_of_module(root)
    n = int(pruner.get_out_channels(root))
    b = _Builder(names[root], n)
    try:
        items = list(graph.get_pruning_group(root, pruner.prune_out_channels, list(range(n))))
    except Exception as exc:
        b.error = (f"Torch-Pruning could not resolve the layers coupled to {names[root]!r}: "
                   f"{type(exc).__name__}: {exc}")
        return b.build(), {root}
    producers: set[nn.Module] = {root}
    for item in items:
        node, handler = item.dep.target, item.dep.handler
        module, owner = node.module, getattr(handler, "__self__", None)
        index = torch.tensor(list(item.idxs), dtype=torch.long)
        channel = torch.tensor(list(item.root_idxs), dtype=torch.long)
        if isinstance(module, nn.Parameter):
            b.error = b.error or (
                f"parameter {graph._param_to_name.get(module, '?')!r} is used outside the "
                "layers Torch-Pruning knows (a custom layer); how its slices follow the "
                "channels cannot be resolved")
            continue
        out = owner is not None and handler == owner.prune_out_channels
        layer = names.get(module)
        if out and not node.outputs:
            b.fixed = b.fixed or ("its channels are outputs of the model (through "
                                  f"{layer or node.name!r})")
        if layer is None:
            continue  # a traced operation: it holds no parameters
        if out:
            producers.add(module)
            if layer in heads:
                h = heads[layer]
                b.heads[h.module] = h
                b.ties.append((("head", h.module), index // h.head_dim, channel))
        b.ops.append(Op(layer, handler, node.pruning_dim, index, channel))
        b.add(layer, module, owner, out, index, channel)
    return b.build(), producers


def _check_heads(groups: list[ChannelGroup]) -> None:
    """Every attention module's projections must be in one group, or its heads stay."""
    seen: dict[str, list[ChannelGroup]] = {}
    for g in groups:
        for h in g.heads:
            seen.setdefault(h.module, []).append(g)
    for module, owners in seen.items():
        if len(owners) > 1:
            for g in owners:
                g.fixed = g.fixed or (f"the q/k/v projections of attention {module!r} fall in "
                                      "different channel groups")


def _check_shared(groups: list[ChannelGroup]) -> None:
    """A parameter slice can follow one group only: a grouped convolution reading channels
    of two groups (a concatenation) would need them removed in step, so both stay."""
    owners: dict[tuple[str, int, int], ChannelGroup] = {}
    for g in groups:
        for s in g.slices:
            for position in set(s.index.tolist()):
                other = owners.setdefault((s.param, s.dim, position), g)
                if other is not g:
                    for h, k in ((g, other), (other, g)):
                        h.fixed = h.fixed or (f"{s.param!r} also follows the channel group of "
                                              f"{k.name!r}")


def _find_heads(model: nn.Module) -> dict[str, Heads]:
    """Projection name -> heads, for modules with a head count and q/k/v Linear children."""
    found: dict[str, Heads] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            continue
        attribute = next((a for a in HEAD_ATTRIBUTES
                          if isinstance(getattr(module, a, None), int)), None)
        if attribute is None:
            continue
        count = getattr(module, attribute)
        for child_name, child in module.named_children():
            if child_name in QKV_NAMES and isinstance(child, nn.Linear) and count > 0 \
                    and child.out_features % count == 0:
                full = _fqn(name, child_name)
                found[full] = Heads(name, attribute, child.out_features // count, full)
    return found
