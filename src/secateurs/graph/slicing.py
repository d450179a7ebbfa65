"""Which parameter slices one Torch-Pruning handler removes: a registry keyed by handler type.

Torch-Pruning's dependency graph says *which* layers are coupled and at which indices; the
rules here say what removing index ``j`` from a layer takes with it (rows of a weight, a
bias entry, a BatchNorm scale and shift), so a mask can cover exactly what compaction will
remove. A handler type registered as *inexact* can be compacted by Torch-Pruning but not so
that the compacted model computes what the masked one does (normalising over the channel
dimension, or tying heads to a width); its channels are kept. Handlers written here for
layers Torch-Pruning does not know (:mod:`.layers`) say their slices themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["INEXACT", "SLICERS", "Cut", "register_slicer"]

F = tp.pruner.function


@dataclass(frozen=True)
class Cut:
    """One parameter slice along ``dim`` at positions ``index`` (one per handler index).

    ``tie`` optionally gives each handler index a key; indices sharing a key can only be
    removed together (the same channel of every group of a grouped convolution).
    """

    param_name: str
    dim: int
    index: torch.Tensor
    tie: torch.Tensor | None = None


Slicer = Callable[[nn.Module, bool, torch.Tensor], list[Cut]]

SLICERS: dict[type, Slicer] = {}

#: Handler types that Torch-Pruning compacts but not exactly, with the reason shown to users.
INEXACT: dict[type, str] = {
    F.LayernormPruner: "it is normalised by LayerNorm {layer!r}, whose mean and variance "
                       "run over every channel",
    F.GroupNormPruner: "it is normalised by GroupNorm {layer!r}, whose statistics run over "
                       "groups of channels",
    F.MultiheadAttentionPruner: "nn.MultiheadAttention {layer!r} ties its heads to its "
                                "embedding width (use separate q/k/v/out projections, e.g. "
                                "secateurs.structured.models.SelfAttention)",
    F.LSTMPruner: "recurrent layer {layer!r} is not compacted",
}


def register_slicer(handler_type: type) -> Callable[[Slicer], Slicer]:
    """Decorator registering the slicing rule of a Torch-Pruning handler type."""

    def deco(fn: Slicer) -> Slicer:
        SLICERS[handler_type] = fn
        return fn

    return deco


def _with_bias(layer: nn.Module, weight_dim: int, index: torch.Tensor) -> list[Cut]:
    cuts = [Cut("weight", weight_dim, index)]
    if getattr(layer, "bias", None) is not None:
        cuts.append(Cut("bias", 0, index))
    return cuts


@register_slicer(F.ConvPruner)
def _conv(layer: nn.Module, out: bool, index: torch.Tensor) -> list[Cut]:
    assert isinstance(layer, nn.modules.conv._ConvNd)
    groups = layer.groups
    if layer.transposed and groups > 1:
        raise ValueError(f"grouped transposed convolution ({layer}) is not supported")
    if out:
        per_group = layer.out_channels // groups
        cuts = _with_bias(layer, 1 if layer.transposed else 0, index)
        # Every group of a grouped convolution must keep as many outputs as the others.
        return [Cut(c.param_name, c.dim, c.index, index % per_group if groups > 1 else None)
                for c in cuts]
    per_group = layer.in_channels // groups
    if groups > 1 and per_group == 1:
        raise ValueError(f"convolution {layer} has one input channel per group; removing one "
                         "would remove a whole group")
    # Input j of a grouped convolution is column j % per_group of the weights of its group.
    return [Cut("weight", 0 if layer.transposed else 1, index % per_group)]


@register_slicer(F.DepthwiseConvPruner)
def _depthwise(layer: nn.Module, out: bool, index: torch.Tensor) -> list[Cut]:
    return _with_bias(layer, 0, index)


@register_slicer(F.LinearPruner)
def _linear(layer: nn.Module, out: bool, index: torch.Tensor) -> list[Cut]:
    return _with_bias(layer, 0, index) if out else [Cut("weight", 1, index)]


@register_slicer(F.BatchnormPruner)
@register_slicer(F.InstanceNormPruner)
def _norm(layer: nn.Module, out: bool, index: torch.Tensor) -> list[Cut]:
    return _with_bias(layer, 0, index) if getattr(layer, "weight", None) is not None else []


@register_slicer(F.PReLUPruner)
def _prelu(layer: nn.Module, out: bool, index: torch.Tensor) -> list[Cut]:
    assert isinstance(layer, nn.PReLU)
    return [Cut("weight", 0, index)] if layer.num_parameters > 1 else []


@register_slicer(F.EmbeddingPruner)
def _embedding(layer: nn.Module, out: bool, index: torch.Tensor) -> list[Cut]:
    return [Cut("weight", 1, index)]
