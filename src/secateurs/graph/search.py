"""The layers coupled to one root layer's output channels: Torch-Pruning's search, bounded.

Torch-Pruning's ``DependencyGraph.get_pruning_group`` follows dependencies from the root,
mapping channel indices through concatenations, splits, reshapes and expansions, until no
new (layer, handler, indices) triple turns up. Some graphs never settle: through a
grouped-query attention's ``repeat_kv`` (an expand then a reshape) the indices change on
every round, and the search ran for hours. This is the same search with a bound on its
steps (a few per dependency of the graph, far more than any graph that settles needs) and
a set lookup instead of a scan of the group for triples already seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group

__all__ = ["Coupled", "Unsettled", "budget", "coupled"]

#: Steps of the search per dependency of the graph.
STEPS_PER_DEPENDENCY = 20


class Unsettled(RuntimeError):
    """The search for coupled layers exceeded its bound."""


@dataclass(frozen=True)
class Coupled:
    """One coupled handler call: ``dep.handler`` on ``dep.target`` at positions ``idxs``,
    which hold the root channels ``root_idxs``."""

    dep: Dependency
    idxs: list[int]
    root_idxs: list[int]


def budget(graph: tp.DependencyGraph) -> int:
    """The most search steps one group may take in ``graph``."""
    deps = sum(len(node.dependencies) for node in graph.module2node.values())
    return 1000 + STEPS_PER_DEPENDENCY * deps


def coupled(graph: tp.DependencyGraph, root: nn.Module, steps: int) -> list[Coupled]:
    """Every handler call that removing all output channels of ``root`` triggers, merged
    per (layer, handler), the root's own first.

    Raises:
        Unsettled: after ``steps`` steps without settling.
    """
    pruner = graph.get_pruner_of_module(root)
    fn = pruner.prune_out_channels
    n = int(pruner.get_out_channels(root))
    if isinstance(root, nn.modules.conv._ConvNd) and root.groups == root.out_channels > 1:
        fn = tp.pruner.function.prune_depthwise_conv_out_channels  # as Torch-Pruning does
    node = graph.module2node[root]
    first = Dependency(fn, fn, source=node, target=node)
    start = [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(n)]
    group = Group()
    group.add_dep(first, start)
    seen: set[tuple[Any, ...]] = {(node, fn, tuple(start))}
    stack = [(first, start)]
    taken = 0
    while stack:
        taken += 1
        if taken > steps:
            raise Unsettled(f"no fixed point after {steps} steps")
        dep, idxs = stack.pop()
        for new in dep.target.dependencies:
            if not new.is_triggered_by(dep.handler):
                continue
            mapped = idxs
            for mapping in new.index_mapping:
                if mapping is not None:
                    mapped = mapping(mapped)
            key = (new.target, new.handler, tuple(mapped))
            if len(mapped) == 0 or key in seen:
                continue
            seen.add(key)
            group.add_dep(new, mapped)
            stack.append((new, mapped))
    merged = Group()
    for dep, idxs in group.items:
        merged.add_and_merge(dep, idxs)
    return [Coupled(dep, _helpers.to_plain_idxs(idxs), _helpers.to_root_idxs(idxs))
            for dep, idxs in merged.items]
