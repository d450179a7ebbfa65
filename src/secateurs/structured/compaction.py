"""Compaction: physically remove channel groups whose masks are off.

Everything is planned and checked on a copy before the model is touched: the copy is
traced (Torch-Pruning's dependency graph), the groups to remove are found from the masks,
Torch-Pruning's per-layer handlers shrink the copy's layers, and the shrunk copy must
compute what the masked model computes on the example inputs. Only then are the new
parameters, buffers and sizes moved into the model and the optimizer rebound.

Which elements survive is read off the handlers themselves: before they run, every
parameter of the copy holds its own flat element indices, so afterwards each new
parameter says which old elements it kept. The same index maps slice the real weights,
their gradients and the optimizer state, so they cannot disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import validation as check
from ..graph.blocks import config_of
from ..graph.groups import ChannelGroup, Structure, bare_copy, discover
from ..graph.layers import out_width
from .verify import CompactionError, compare, record

__all__ = ["CompactionError", "check_compactable", "compact_"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Call:
    """One merged handler call on the copy: ``handler(module, index)``."""

    module: str
    handler: Callable[..., Any]
    pruning_dim: int
    index: list[int]
    out: bool


def compact_(
    model: nn.Module,
    example_inputs: Any,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    atol: float = 1e-5,
) -> nn.Module:
    """Remove the channel groups (filters, neurons, heads) whose masks are off, in place.

    A unit of a channel group is removed when every slice ``masks`` covers of its
    producers (the filter, its bias, its BatchNorm scale and shift) is masked, or every
    covered input column of its consumers is; with ``masks=None``, when those slices are
    all exactly zero. Groups whose channels are outputs of the model or are normalised by
    a LayerNorm stay. The compacted model computes what the model with ``masks`` applied
    computes (checked on ``example_inputs``, float32 within ``atol``).

    Args:
        model: Changed in place: its layers shrink, its ``state_dict`` keeps its keys.
        example_inputs: Inputs the model can be called on (a tensor, a tuple of
            positional arguments, or a dict of keyword arguments).
        masks: Parameter name -> bool mask (``True`` = kept), e.g. ``pruner.masks``.
        optimizer: If given, rebound to the new parameters, its per-element state
            (momentum, Adam moments) sliced like them, so training continues.
        atol: Tolerance of the output check, scaled by the largest output magnitude.

    Returns:
        ``model``, compacted. A :class:`~secateurs.Pruner` built on it before is stale.

    Raises:
        CompactionError: (a ``ValueError``) if a group to remove cannot be resolved, a
            layer fails, or the outputs would change; the message names the layer and
            the model is left unchanged.
        ValueError, TypeError: for masks that do not fit the model;
            :class:`~secateurs.validation.ArgumentTypeError` (a ``TypeError``) for
            ``model``, ``masks``, ``optimizer`` or ``atol`` of the wrong type, before
            anything is traced.
    """
    _check_arguments(model, masks, optimizer, atol)
    work = bare_copy(model)
    flags = {n: p.requires_grad for n, p in work.named_parameters()}
    structure = discover(work, example_inputs, in_place=True)
    params = dict(work.named_parameters())
    _check_masks(masks, params)
    plan = _plan(structure, masks, params)
    if not plan:
        return model
    calls = _merge(plan)
    _check_optimizer(optimizer, model, {c.module for c in calls})
    if masks is not None:
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].masked_fill_(~mask.to(params[name].device), 0)
    reference = record(work, example_inputs, compacted=False)
    maps = _shrink(work, calls, plan)
    for n, p in work.named_parameters():
        p.requires_grad_(flags[n])
    compare(reference, record(work, example_inputs), _removed_outputs(calls), atol)
    _move(model, work, maps, optimizer)
    if masks is not None:
        _apply_remaining(model, masks)
    _update_configs(model, structure)
    return model


def check_compactable(model: nn.Module, example_inputs: Any) -> None:
    """Raise :class:`CompactionError` unless every prunable channel group of ``model`` can
    be compacted exactly; the model is not changed (the check runs on a copy).

    One unit of each group is masked whole and compacted away, so a failure shows before
    any training is spent, not at the end.
    """
    work = bare_copy(model)
    structure = discover(work, example_inputs)
    keeps = {}
    for g in structure.groups:
        if g.prunable and g.units > 1:
            keep = torch.ones(g.units, dtype=torch.bool)
            keep[0] = False
            keeps[g.name] = keep
    compact_(work, example_inputs, structure.masks(keeps))


def _check_arguments(model: object, masks: object, optimizer: object, atol: object) -> None:
    check.instance("model", model, nn.Module, "a torch.nn.Module")
    check.optional(check.instance, "masks", masks, types=Mapping,
                   what="a mapping parameter name -> torch.bool mask (e.g. pruner.masks), "
                        "or None")
    check.optional(check.instance, "optimizer", optimizer, types=torch.optim.Optimizer,
                   what="a torch.optim.Optimizer or None")
    check.number("atol", atol, low=0.0)


def _check_masks(masks: Mapping[str, torch.Tensor] | None,
                 params: Mapping[str, nn.Parameter]) -> None:
    if masks is None:
        return
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask {name!r} names no parameter of the model; parameters "
                             f"include {', '.join(list(params)[:6])}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                or mask.shape != params[name].shape:
            raise TypeError(f"mask for {name!r} must be a torch.bool tensor of shape "
                            f"{tuple(params[name].shape)}, got {mask!r:.80}")


def _plan(structure: Structure, masks: Mapping[str, torch.Tensor] | None,
          params: Mapping[str, nn.Parameter]) -> list[tuple[ChannelGroup, torch.Tensor]]:
    """Groups with units to remove, and which; raises for groups that cannot be resolved."""
    plan = []
    for g in structure.groups:
        if masks is None:
            covered = {p: params[p].detach() != 0 for p in g.params}
        else:
            covered = {p: masks[p] for p in g.params if p in masks}
        off = g.off(covered) if covered else torch.zeros(g.units, dtype=torch.bool)
        if not bool(off.any()) or g.fixed is not None:
            continue
        if g.error is not None:
            raise CompactionError(f"cannot compact the channel group of {g.name!r}: "
                                  f"{g.error}; the model was left unchanged")
        if bool(off.all()):
            off[0] = False  # a layer keeps one (all-zero) channel rather than none
        plan.append((g, off))
    return plan


def _merge(plan: list[tuple[ChannelGroup, torch.Tensor]]) -> list[_Call]:
    """One call per (layer, handler): indices are in the unshrunk layer's coordinates, so
    groups meeting in one layer (a concatenation) cannot shift each other's indices."""
    merged: dict[tuple[str, Any], tuple[set[int], int, bool]] = {}
    for g, off in plan:
        gone = off[g.unit_of]
        for op in g.ops:
            owner = getattr(op.handler, "__self__", None)
            out = owner is not None and op.handler == owner.prune_out_channels
            index, _, _ = merged.setdefault((op.module, op.handler), (set(), op.pruning_dim, out))
            index.update(op.index[gone[op.channel]].tolist())
    return [_Call(module, handler, dim, sorted(index), out)
            for (module, handler), (index, dim, out) in merged.items() if index]


def _removed_outputs(calls: list[_Call]) -> dict[str, torch.Tensor]:
    return {c.module: torch.tensor(c.index, dtype=torch.long) for c in calls if c.out}


def _shrink(work: nn.Module, calls: list[_Call], plan: list[tuple[ChannelGroup, torch.Tensor]]
            ) -> dict[str, torch.Tensor]:
    """Run the handlers on ``work``; return parameter name -> kept flat old indices."""
    real = {n: p.detach() for n, p in work.named_parameters()}
    with torch.no_grad():
        for p in work.parameters():
            p.data = torch.arange(p.numel(), dtype=torch.float64).view(p.shape)
            p.grad = None
    for call in calls:
        module = work.get_submodule(call.module)
        try:
            # Torch-Pruning's handlers read the dimension to cut from their owner.
            call.handler.__self__.pruning_dim = call.pruning_dim  # type: ignore[attr-defined]
            call.handler(module, call.index)
        except Exception as exc:
            raise CompactionError(
                f"Torch-Pruning failed to shrink layer {call.module!r} "
                f"({type(module).__name__}): {type(exc).__name__}: {exc}; the model was left "
                "unchanged") from exc
    for g, _ in plan:
        for h in g.heads:
            projection = work.get_submodule(h.projection)
            assert isinstance(projection, nn.Linear)
            count = projection.out_features // h.head_dim
            setattr(work.get_submodule(h.module), h.attribute, count)
        for r in g.resizes:
            if not r.config:
                width = out_width(work.get_submodule(r.source))
                setattr(work.get_submodule(r.module), r.attribute, r.size(width))
    maps = {}
    for name, p in work.named_parameters():
        index = p.detach().long()
        with torch.no_grad():
            p.data = real[name].reshape(-1)[index.reshape(-1).to(real[name].device)
                                            ].view(index.shape)
        maps[name] = index
    return maps


def _check_optimizer(optimizer: torch.optim.Optimizer | None, model: nn.Module,
                     modules: set[str]) -> None:
    """Every state tensor of a parameter that shrinks must be per-element or a scalar."""
    if optimizer is None:
        return
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] not in modules:
            continue
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(f"optimizer state {key!r} of {name!r} has shape "
                                 f"{tuple(value.shape)}, neither per-element "
                                 f"{tuple(p.shape)} nor a scalar; it cannot be sliced")


def _move(model: nn.Module, work: nn.Module, maps: Mapping[str, torch.Tensor],
          optimizer: torch.optim.Optimizer | None) -> None:
    """Move shrunk parameters, buffers and sizes from ``work`` into ``model``."""
    old_modules = dict(model.named_modules())
    swapped: dict[nn.Parameter, tuple[nn.Parameter, torch.Tensor]] = {}
    for name, new in work.named_modules():
        old = old_modules[name]
        for key, p in new._parameters.items():
            q = old._parameters.get(key)
            if p is None or q is None or p.shape == q.shape:
                continue
            index = maps[f"{name}.{key}" if name else key].reshape(-1)
            fresh = nn.Parameter(p.detach().to(q.device), requires_grad=q.requires_grad)
            if q.grad is not None:
                fresh.grad = q.grad.reshape(-1)[index.to(q.device)].view(p.shape)
            old._parameters[key] = fresh
            swapped[q] = (fresh, index)
        for key, b in new._buffers.items():
            if b is not None and old._buffers.get(key) is not None \
                    and b.shape != old._buffers[key].shape:
                old._buffers[key] = b
        for key, value in vars(new).items():
            if not key.startswith("_") and key != "training" \
                    and isinstance(value, (bool, int, float, str, tuple)) \
                    and vars(old).get(key) != value:
                setattr(old, key, value)
    if optimizer is not None:
        _rebind(optimizer, swapped)


def _update_configs(model: nn.Module, structure: Structure) -> None:
    """Set the configuration entries that follow layer widths (heads, key/value heads, MLP
    width) where every layer agrees; where layers differ the configuration cannot say it,
    and is left alone."""
    found: dict[tuple[int, str], tuple[Any, set[int]]] = {}
    for g in structure.groups:
        for r in g.resizes:
            config = config_of(model, r.module) if r.config else None
            if config is not None:
                value = r.size(out_width(model.get_submodule(r.source)))
                found.setdefault((id(config), r.attribute), (config, set()))[1].add(value)
    for (_, attribute), (config, values) in found.items():
        if len(values) == 1:
            setattr(config, attribute, values.pop())
        else:
            logger.warning("the layers of %s now differ in %s (%s): its config keeps %s=%s, so "
                           "a model rebuilt from the config alone would not fit the weights",
                           type(model).__name__, attribute, sorted(values), attribute,
                           getattr(config, attribute, None))


@torch.no_grad()
def _apply_remaining(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero what ``masks`` prune in parameters that kept their shape, as the check did."""
    for name, p in model.named_parameters():
        mask = masks.get(name)
        if mask is not None and mask.shape == p.shape:
            p.masked_fill_(~mask.to(p.device), 0)


def _rebind(optimizer: torch.optim.Optimizer,
            swapped: Mapping[nn.Parameter, tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Point the optimizer at the new parameters; slice their per-element state."""
    for group in optimizer.param_groups:
        group["params"] = [swapped[p][0] if p in swapped else p for p in group["params"]]
    for old, (new, index) in swapped.items():
        state = optimizer.state.pop(old, None)
        if state is None:
            continue
        optimizer.state[new] = {
            k: v.reshape(-1)[index.to(v.device)].view(new.shape)
            if isinstance(v, torch.Tensor) and v.shape == old.shape else v
            for k, v in state.items()}
