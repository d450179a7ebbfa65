"""Channel groups: which parameter slices must be removed together, found by tracing.

A *channel group* is every parameter slice that one output channel (a filter, a neuron,
a head's dimension) reaches: the producing filter and its bias, the BatchNorm scale and
shift after it, the matching input columns of every layer that reads it, and the same for
every layer coupled to it by a residual addition, a concatenation or a depthwise
convolution. Torch-Pruning's ``DependencyGraph`` (Fang et al. 2023, "DepGraph") traces
the coupling; :mod:`.slicing` turns each coupled handler into parameter slices.

Channels that can only go together form one *unit*: the channels of one attention head,
or the same channel of every group of a grouped convolution. Selection ranks units.

Known transformer blocks (attention with q/k/v/o projections, gated MLPs, GPT-2's fused
attention and MLP, see :mod:`.blocks`) have their groups built directly and are traced as
single steps on the residual stream; layers Torch-Pruning does not know (GPT-2's
``Conv1D``, RMS norms) get handlers of their own (:mod:`.layers`); and the search for
coupled layers is bounded (:mod:`.search`), so no model makes discovery run unbounded.

This module sits low in the layers (it imports only torch, torch_pruning and
:mod:`secateurs.targets`), so the pruner can build group-aware masks with it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from ..targets import is_transposed_linear
from .blocks import Block, find_blocks
from .layers import TRANSPOSED, NormPruner, SlicingPruner, is_norm, opaque
from .search import Unsettled, budget, coupled
from .slicing import INEXACT, SLICERS, Cut
from .structure import ChannelGroup, Heads, Op, Resize, Slice, Structure

__all__ = ["ChannelGroup", "Heads", "Op", "Resize", "Slice", "Structure", "bare_copy",
           "discover", "forward", "tensors"]

logger = logging.getLogger(__name__)

#: Names of the query, key and value projections of an attention module with heads.
QKV_NAMES = frozenset({"q", "k", "v", "query", "key", "value", "q_proj", "k_proj", "v_proj",
                       "to_q", "to_k", "to_v", "wq", "wk", "wv"})
#: Attributes holding the number of heads, in the order they are looked up.
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads")
_ROOTS = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)
_NORM = NormPruner()


def forward(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on example inputs: ``model(**x)`` for a mapping, ``model(*x)`` for a
    tuple or list, ``model(x)`` otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def tensors(output: Any) -> list[torch.Tensor]:
    """The tensors inside a model's output (tensor, tuple, list, dict, ``ModelOutput``);
    other objects in it (a key/value cache) are left out."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in tensors(v)]
    return []


def _traced_forward(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """The outputs Torch-Pruning traces back from: tensors that autograd reaches."""
    return [t for t in tensors(forward(model, inputs)) if t.grad_fn is not None]


def discover(model: nn.Module, example_inputs: Any, *, in_place: bool = False) -> Structure:
    """Trace ``model`` on ``example_inputs`` and return its channel groups.

    The trace runs on a copy (with its hooks removed), so the model, its mode and any
    statistics hooks are left alone, unless ``in_place`` (for a copy made by the caller).
    Progress goes to the ``secateurs.graph.groups`` logger (and a progress bar when
    resolving the groups takes more than a few seconds).

    Raises:
        ValueError: if the model cannot be traced with ``example_inputs``.
    """
    traced = model if in_place else bare_copy(model)
    for p in traced.parameters():
        p.requires_grad_(True)
    blocks = find_blocks(traced)
    customized, hidden = _customized(traced, blocks)
    if blocks:
        kinds = [b.kind for b in blocks]
        logger.info("%s: %d attention and %d MLP blocks recognised; their heads and neurons "
                    "are grouped directly", type(model).__name__, kinds.count("attention"),
                    kinds.count("mlp"))
    logger.info("tracing %s with Torch-Pruning", type(model).__name__)
    try:
        with torch.enable_grad(), opaque(hidden):
            graph = tp.DependencyGraph().build_dependency(
                traced, example_inputs, forward_fn=_traced_forward, verbose=False,
                customized_pruners=customized)
    except Exception as exc:
        raise ValueError(f"Torch-Pruning could not trace {type(model).__name__} with the "
                         f"example inputs: {type(exc).__name__}: {exc}") from exc
    names = {m: n for n, m in traced.named_modules()}
    heads = _find_heads(traced)
    groups: list[ChannelGroup] = []
    visited: set[nn.Module] = set()
    roots = [m for m in graph.module2node
             if isinstance(m, _ROOTS) or (isinstance(m, nn.Module) and is_transposed_linear(m))]
    steps = budget(graph)
    for module in tqdm(roots, desc="channel groups", leave=False, delay=3.0):
        if module not in visited:
            group, producers = _group(graph, module, names, heads, steps)
            visited.update(producers)
            groups.append(group)
    groups += [b.group for b in blocks]
    _check_heads(groups)
    _check_shared(groups)
    logger.info("%s: %d channel groups, %d prunable", type(model).__name__, len(groups),
                sum(g.prunable for g in groups))
    shapes = {n: p.shape for n, p in traced.named_parameters()}
    return Structure(groups, shapes)


def _customized(model: nn.Module, blocks: list[Block]
                ) -> tuple[dict[type, tp.pruner.BasePruningFunc], list[nn.Module]]:
    """Handlers of the layer types Torch-Pruning does not know, and the modules traced as
    single steps: recognised blocks, transposed linear layers and norms outside them."""
    pruners: dict[type, tp.pruner.BasePruningFunc] = {}
    hidden: list[nn.Module] = []
    inside: set[nn.Module] = set()
    for b in blocks:
        module = model.get_submodule(b.module)
        pruners[type(module)] = b.pruner
        hidden.append(module)
        inside.update(module.modules())
    for m in model.modules():
        if m in inside or type(m) in pruners:
            continue
        if is_transposed_linear(m):
            pruners[type(m)] = TRANSPOSED
        elif is_norm(m):
            pruners[type(m)] = _NORM
    hidden += [m for m in model.modules() if m not in inside and type(m) in pruners]
    return pruners, list(dict.fromkeys(hidden))


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
            self.fixed = self.fixed or INEXACT[type(owner)].format(
                layer=layer, kind=type(module).__name__)
            return
        slicer = owner.cuts if isinstance(owner, SlicingPruner) else SLICERS.get(type(owner))
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
           heads: Mapping[str, Heads], steps: int) -> tuple[ChannelGroup, set[nn.Module]]:
    """The channel group rooted at the output channels of ``root``."""
    n = int(graph.get_pruner_of_module(root).get_out_channels(root))
    b = _Builder(names[root], n)
    try:
        items = coupled(graph, root, steps)
    except Unsettled as exc:
        b.error = (f"Torch-Pruning's search for the layers coupled to {names[root]!r} does not "
                   f"settle ({exc}): an operation it cannot follow, such as key/value heads "
                   "repeated for grouped-query attention, mixes its channels")
        logger.warning("%s", b.error)
        return b.build(), {root}
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
