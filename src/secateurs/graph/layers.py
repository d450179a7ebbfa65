"""Torch-Pruning handlers for layers it does not know, and tracing them as single steps.

Torch-Pruning traces a model through autograd and knows the standard layers. Three kinds
it does not know are common in language models:

- transposed linear layers (Hugging Face GPT-2's ``Conv1D``, weight ``(in, out)``):
  :class:`TransposedLinearPruner` removes weight columns for outputs and rows for inputs;
- RMS norms (``LlamaRMSNorm``, ``torch.nn.RMSNorm``, T5's layer norm): :class:`NormPruner`
  couples a norm's channels to its neighbours and marks them inexact (its root mean
  square runs over every channel, so removing one changes the others);
- whole blocks whose inner structure is known (attention with q/k/v/o projections, gated
  MLPs): :class:`BlockPruner` stands for the block on the residual stream, where it reads
  the inputs of some child layers and writes the outputs of others.

Each handler says which parameter slices it removes (:meth:`SlicingPruner.cuts`), as the
rules of :mod:`.slicing` do for Torch-Pruning's own handlers. While tracing,
:func:`opaque` makes each such module one autograd step from its input (and parameters) to
its output, so the search never walks their insides (a grouped-query attention's repeated
key/value heads send Torch-Pruning's index search into a loop that does not settle).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc

from ..targets import is_transposed_linear
from .slicing import INEXACT, Cut

__all__ = ["BlockPruner", "NormPruner", "SlicingPruner", "TransposedLinearPruner", "is_norm",
           "opaque", "out_width"]

F = tp.pruner.function
#: Torch-Pruning's handler of ``nn.Linear`` (the instance its graphs use).
LINEAR = F.PrunerBox[tp.ops.OPTYPE.LINEAR]


class SlicingPruner(BasePruningFunc):
    """A Torch-Pruning handler that also says which parameter slices it removes."""

    @abc.abstractmethod
    def cuts(self, layer: nn.Module, out: bool, index: torch.Tensor) -> list[Cut]:
        """The slices that removing positions ``index`` (outputs if ``out``) takes."""


def out_width(layer: nn.Module) -> int:
    """Output features of a linear layer, transposed (``(in, out)`` weight) or not."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    weight = layer.get_parameter("weight")
    return int(weight.shape[1] if is_transposed_linear(layer) else weight.shape[0])


def _keep(size: int, idxs: Sequence[int]) -> list[int]:
    gone = set(idxs)
    return [i for i in range(size) if i not in gone]


def _set_width(layer: nn.Module, attribute: str, width: int) -> None:
    """Set a width attribute the layer keeps beside its weight (Conv1D's ``nf``, ``nx``)."""
    if isinstance(getattr(layer, attribute, None), int):
        setattr(layer, attribute, width)


class TransposedLinearPruner(SlicingPruner):
    """Handler of a linear layer stored ``(in, out)``: ``y = x @ W + b`` (GPT-2's Conv1D).

    Outputs are weight columns (dim 1) and bias entries, inputs are weight rows (dim 0);
    the layer's ``nf`` / ``nx`` width attributes, where it has them, follow.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(self.get_out_channels(layer), idxs)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if getattr(layer, "bias", None) is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        _set_width(layer, "nf", len(keep))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(self.get_in_channels(layer), idxs)
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        _set_width(layer, "nx", len(keep))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.get_parameter("weight").shape[1])

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.get_parameter("weight").shape[0])

    def cuts(self, layer: nn.Module, out: bool, index: torch.Tensor) -> list[Cut]:
        if not out:
            return [Cut("weight", 0, index)]
        bias = [Cut("bias", 0, index)] if getattr(layer, "bias", None) is not None else []
        return [Cut("weight", 1, index), *bias]


class NormPruner(SlicingPruner):
    """Handler of a norm over the channel dimension with an optional per-channel scale
    (and shift): channels pass through it, so inputs and outputs are one."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        for name in ("weight", "bias"):
            p = getattr(layer, name, None)
            if isinstance(p, nn.Parameter):
                setattr(layer, name, self._prune_parameter_and_grad(
                    p, _keep(p.shape[0], idxs), 0))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int | None:
        p = getattr(layer, "weight", None)
        return int(p.shape[0]) if isinstance(p, nn.Parameter) else None

    get_in_channels = get_out_channels

    def cuts(self, layer: nn.Module, out: bool, index: torch.Tensor) -> list[Cut]:
        return [Cut(name, 0, index) for name in ("weight", "bias")
                if isinstance(getattr(layer, name, None), nn.Parameter)]


INEXACT[NormPruner] = ("it is normalised by {kind} {layer!r}, whose statistics run over "
                       "every channel")


def is_norm(module: nn.Module) -> bool:
    """A norm layer Torch-Pruning does not know: a leaf module named like a norm
    (``LlamaRMSNorm``, ``torch.nn.RMSNorm``, ``T5LayerNorm``) with at most a 1-d scale and
    shift."""
    if next(module.children(), None) is not None:
        return False
    if tp.ops.module2type(module) != tp.ops.OPTYPE.ELEMENTWISE:
        return False  # a layer Torch-Pruning knows (LayerNorm, BatchNorm, GroupNorm)
    if "norm" not in type(module).__name__.lower():
        return False
    return all(p.dim() == 1 for p in module.parameters(recurse=False))


class BlockPruner(SlicingPruner):
    """Handler of a block on the residual stream: removing its input channels removes
    input columns of the ``inputs`` children, removing its output channels removes output
    rows of the ``outputs`` children (what a block's own heads and neurons couple is built
    apart, by :mod:`.blocks`)."""

    def __init__(self, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        super().__init__()
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)

    def _child(self, layer: nn.Module, name: str) -> tuple[nn.Module, BasePruningFunc]:
        child = layer.get_submodule(name)
        return child, TRANSPOSED if is_transposed_linear(child) else LINEAR

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        for name in self.outputs:
            child, handler = self._child(layer, name)
            handler.prune_out_channels(child, idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        for name in self.inputs:
            child, handler = self._child(layer, name)
            handler.prune_in_channels(child, idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        child, handler = self._child(layer, self.outputs[0])
        return int(handler.get_out_channels(child))

    def get_in_channels(self, layer: nn.Module) -> int:
        child, handler = self._child(layer, self.inputs[0])
        return int(handler.get_in_channels(child))

    def cuts(self, layer: nn.Module, out: bool, index: torch.Tensor) -> list[Cut]:
        found: list[Cut] = []
        for name in self.outputs if out else self.inputs:
            child = layer.get_submodule(name)
            if is_transposed_linear(child):
                child_cuts = TRANSPOSED.cuts(child, out, index)
            elif out:
                child_cuts = [Cut("weight", 0, index)] + (
                    [Cut("bias", 0, index)] if child.bias is not None else [])
            else:
                child_cuts = [Cut("weight", 1, index)]
            found += [Cut(f"{name}.{c.param_name}", c.dim, c.index, c.tie) for c in child_cuts]
        return found


TRANSPOSED = TransposedLinearPruner()


class _Opaque(torch.autograd.Function):
    """One autograd step from a module's input and parameters to its output (computed
    apart, without gradients): what Torch-Pruning's trace sees of the module."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.inputs = len(inputs)
        return y.clone()

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        return (None,) * (1 + ctx.inputs)


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


def _opaque_forward(module: nn.Module) -> Any:
    run = module.forward  # the instance's own wrapper (an accelerate hook), or the class's
    params = tuple(module.parameters())

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = _first_tensor(args, kwargs)
        with torch.no_grad():
            out = run(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        if not isinstance(y, torch.Tensor) or x is None:
            return out
        y = _Opaque.apply(y, x, *params)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    return forward


@contextmanager
def opaque(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Within the context, each of ``modules`` runs as one autograd step from its first
    tensor input (and its parameters) to its (first) output."""
    missing = object()
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for m in modules:
            patched.append((m, vars(m).get("forward", missing)))
            m.forward = _opaque_forward(m)
        yield
    finally:
        for m, before in patched:
            if before is missing:
                del m.forward
            else:
                m.forward = before
