"""Checking that a compacted model computes what the masked one did, and saying where not.

A run is recorded with hooks on every module: per output, one vector of sums along each
dimension (a few numbers per layer, whatever the batch), so a mismatch can be traced to
the first layer whose output changed without keeping activations in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..graph.groups import forward, tensors

__all__ = ["CompactionError", "Recording", "compare", "flatten", "record"]


class CompactionError(ValueError):
    """A model that cannot be compacted exactly; the message names the layer."""


@dataclass
class Recording:
    """Per-module output signatures of one run, in execution order."""

    shapes: dict[str, torch.Size] = field(default_factory=dict)
    sums: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    stack: list[str] = field(default_factory=list)
    output: Any = None


def flatten(output: Any) -> list[torch.Tensor]:
    """The tensors inside a model's output (tensor, tuple, list, dict, ``ModelOutput``)."""
    return tensors(output)


def _signature(y: torch.Tensor) -> list[torch.Tensor]:
    y = y.detach().double()
    return [y.sum([d for d in range(y.dim()) if d != k]) if y.dim() > 1 else y
            for k in range(y.dim())]


@contextmanager
def _hooks(model: nn.Module, rec: Recording) -> Iterator[None]:
    handles = []
    for name, module in model.named_modules():
        def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
            rec.stack.append(name)

        def post(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
            rec.stack.pop()
            tensors = flatten(out)
            if tensors and name not in rec.shapes:
                rec.shapes[name] = tensors[0].shape
                rec.sums[name] = _signature(tensors[0])

        handles += [module.register_forward_pre_hook(pre),
                    module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record(model: nn.Module, inputs: Any, compacted: bool = True) -> Recording:
    """Run ``model`` in eval mode without gradients and record every module's output.

    Raises:
        CompactionError: if the model raises; the message names the innermost layer that
            was running.
    """
    rec = Recording()
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), _hooks(model, rec):
            rec.output = forward(model, inputs)
    except Exception as exc:
        where = rec.stack[-1] if rec.stack else ""
        layer = f"layer {where!r} ({type(model.get_submodule(where)).__name__})" if where \
            else "the model"
        why = (". The dependency graph did not model how this layer's inputs follow the "
               "removed channels; exclude it from targets or make it a standard layer"
               if compacted else " on the example inputs")
        what = "the compacted model" if compacted else "the masked model"
        raise CompactionError(
            f"{what} fails in {layer}: {type(exc).__name__}: {exc}{why}") from exc
    finally:
        model.train(was)
    return rec


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=atol * scale))


def compare(reference: Recording, compacted: Recording, removed: Mapping[str, torch.Tensor],
            atol: float) -> None:
    """Raise :class:`CompactionError` if the outputs differ, naming the first layer whose
    output changed.

    Args:
        removed: Layer name -> positions removed from its output channels, to compare the
            outputs of layers that shrank on the channels they keep.
    """
    ref, out = flatten(reference.output), flatten(compacted.output)
    if len(ref) == len(out) and all(_close(a, b.double(), atol)
                                    for a, b in zip((r.double() for r in ref), out, strict=True)):
        return
    layer = _first_change(reference, compacted, removed)
    where = f"the output of layer {layer!r} changes" if layer else "the model's output changes"
    raise CompactionError(
        f"compaction would change what the model computes: {where} (beyond atol={atol}). "
        "Either the masks leave part of a removed channel group active (mask whole groups, "
        "as Pruner(..., granularity='channel', example_inputs=...) does), or an operation "
        "mixes or reorders channels in a way the dependency graph does not model")


def _first_change(reference: Recording, compacted: Recording,
                  removed: Mapping[str, torch.Tensor]) -> str | None:
    for name, shape in reference.shapes.items():
        if name not in compacted.shapes or name == "":
            continue
        a, b = reference.sums[name], compacted.sums[name]
        if shape == compacted.shapes[name]:
            if not all(_close(x, y, 1e-4) for x, y in zip(a, b, strict=True)):
                return name
            continue
        differ = [d for d, (m, n) in enumerate(zip(shape, compacted.shapes[name], strict=False))
                  if m != n]
        gone = removed.get(name)
        if len(shape) != len(compacted.shapes[name]) or len(differ) != 1 or gone is None:
            continue
        keep = torch.ones(shape[differ[0]], dtype=torch.bool)
        keep[gone] = False
        if int(keep.sum()) != compacted.shapes[name][differ[0]] \
                or not _close(a[differ[0]][keep], b[differ[0]], 1e-4):
            return name
    return None
