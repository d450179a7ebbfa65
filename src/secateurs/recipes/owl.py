"""Outlier-weighted layer-wise sparsity (OWL; Yin et al. 2023, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Blocks holding more outlier features lose less. Per block ``l``, the outlier ratio ``D_l``
is the share of its Wanda scores ``|w_ij| * ||x_j||_2`` (all its targets together) above
``M`` times their mean. The ratios are scaled to ``[0, 2 lambda]``, shifted so that their
mean is ``1 - s``, and used as densities: block sparsities span ``[s - lambda, s + lambda]``
and average to ``s``. The mean here is weighted by parameter count, so the realised
overall sparsity is ``s`` even when blocks differ in size (with equal blocks it is OWL's
plain mean); sparsities are clipped to ``[0, 0.99]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..calibration import Batch, calibrate
from ..oneshot import block_of
from ..targets import Target

__all__ = ["outlier_ratios", "owl_allocation", "owl_sparsity"]

_CEILING = 0.99


@torch.no_grad()
def outlier_ratios(model: nn.Module, batches: Iterable[Batch], targets: Sequence[Target], *,
                   threshold: float = 5.0, progress: bool = True) -> dict[str, float]:
    """Block name (:func:`~secateurs.oneshot.block_of`) -> share of its targets' Wanda
    scores above ``threshold`` times their mean, from one pass over ``batches`` on the
    model as it is."""
    stats = calibrate(model, batches, targets, powers=(2.0,), progress=progress)
    blocks: dict[str, list[torch.Tensor]] = {}
    for t in targets:
        w = t.rows(t.param.detach()).flatten(1).float()
        norm = stats[t.name].norm(2.0).to(w.device, torch.float32)
        blocks.setdefault(block_of(t.module_name), []).append((w.abs() * norm).reshape(-1))
    ratios = {}
    for name, parts in blocks.items():
        scores = torch.cat(parts)
        ratios[name] = float((scores > threshold * scores.mean()).double().mean())
    return ratios


def owl_allocation(ratios: dict[str, float], sizes: dict[str, int], sparsity: float,
                   spread: float) -> dict[str, float]:
    """Block sparsities from outlier ratios: OWL's formula, mean weighted by ``sizes``.

    ``density_l = 2 lambda (D_l - min D) / (max D - min D)``, shifted so that the
    size-weighted mean density is ``1 - s``; ``sparsity_l = 1 - density_l``, clipped to
    ``[0, 0.99]``. Equal ratios (or ``lambda = 0``) give ``s`` everywhere.
    """
    low, high = min(ratios.values()), max(ratios.values())
    span = high - low
    raw = {b: 2.0 * spread * (r - low) / span if span > 0 else 0.0 for b, r in ratios.items()}
    total = sum(sizes[b] for b in raw)
    mean = sum(raw[b] * sizes[b] for b in raw) / total
    return {b: min(max(1.0 - (raw[b] - mean + 1.0 - sparsity), 0.0), _CEILING) for b in raw}


def owl_sparsity(model: nn.Module, batches: Iterable[Batch], targets: Sequence[Target],
                 sparsity: float, *, threshold: float = 5.0, spread: float = 0.08,
                 progress: bool = True) -> dict[str, float]:
    """Target name -> sparsity of its block under OWL (see the module docstring)."""
    ratios = outlier_ratios(model, batches, targets, threshold=threshold, progress=progress)
    sizes: dict[str, int] = {}
    for t in targets:
        key = block_of(t.module_name)
        sizes[key] = sizes.get(key, 0) + t.param.numel()
    blocks = owl_allocation(ratios, sizes, sparsity, spread)
    return {t.name: blocks[block_of(t.module_name)] for t in targets}
