"""What compaction changed in a Hugging Face model, and whether its config can say it.

Compaction shrinks layers in place (fewer heads, fewer feed-forward neurons) and leaves
``model.config`` as it was. :func:`describe` compares the model with one built from a
config on the ``meta`` device (no memory): per module, the plain attributes that differ
(``num_attention_heads``, ``in_features``, ``out_features``, ...) and the tensors whose
shapes differ. :func:`config_changes` tries the config fields that set those widths and
keeps them only if a model built from the changed config has exactly the compacted
shapes and attributes; :func:`apply_widths` makes a freshly built model compacted again.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..graph.groups import HEAD_ATTRIBUTES

__all__ = ["FFN_FIELDS", "HEAD_FIELDS", "Widths", "apply_widths", "build", "config_changes",
           "describe"]

#: Config fields holding the number of attention heads (aliases resolve through the
#: config's ``attribute_map``, e.g. GPT-2's ``n_head``).
HEAD_FIELDS = ("num_attention_heads",)
#: Config fields holding the width of the feed-forward layers.
FFN_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "dim_feedforward")

_PLAIN = (bool, int, float, str)


@dataclass(frozen=True)
class Widths:
    """How a model differs from one built from a config.

    Attributes:
        modules: Module name -> attribute -> ``[built, actual]`` (JSON-ready: tuples are
            lists) for every module with a changed attribute or a reshaped tensor.
        shapes: ``state_dict`` name -> ``(built shape, actual shape)`` where they differ.
    """

    modules: dict[str, dict[str, list[Any]]]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


def build(cls: type[nn.Module], config: Any, *, meta: bool = False) -> nn.Module:
    """``cls(config)`` on a copy of ``config``, on the ``meta`` device if ``meta``."""
    config = copy.deepcopy(config)
    if meta:
        with torch.device("meta"):
            return cls(config)
    return cls(config)


def _recordable(key: str, value: object) -> bool:
    # What compaction moves into a shrunk module: public plain attributes (as
    # structured.compaction does), tuples of them included (LayerNorm's normalized_shape).
    if key.startswith("_") or key == "training":
        return False
    if isinstance(value, tuple):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def _same(a: object, b: object) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float)
                      and math.isnan(a) and math.isnan(b))


def _json(value: object) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor, persistent)`` of a module's own parameters and buffers."""
    for key, p in module._parameters.items():
        if p is not None:
            yield key, p, True
    for key, b in module._buffers.items():
        if b is not None:
            yield key, b, key not in module._non_persistent_buffers_set


def describe(model: nn.Module, built: nn.Module) -> Widths:
    """How ``model`` differs from ``built`` (the same class, built from a config).

    Raises:
        ValueError: if they differ in anything but widths (other modules or tensor names),
            or a tensor that is not saved (a non-persistent buffer) changed shape: such a
            model cannot be rebuilt from its config and a file.
    """
    theirs = dict(built.named_modules())
    mine = dict(model.named_modules())
    if list(theirs) != list(mine) or any(type(theirs[n]) is not type(m) for n, m in mine.items()):
        odd = [n for n in mine if n not in theirs or type(theirs[n]) is not type(mine[n])]
        raise ValueError(f"the model's modules differ from a {type(built).__name__} built from "
                         f"its config ({(odd or list(set(theirs) - set(mine)))[:4]}): only "
                         "compaction (narrower layers) can be saved and rebuilt")
    modules: dict[str, dict[str, list[Any]]] = {}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for name, module in mine.items():
        other = theirs[name]
        ref = vars(other)
        attrs = {k: [_json(ref.get(k)), _json(v)] for k, v in vars(module).items()
                 if _recordable(k, v) and not _same(ref.get(k), v)}
        own = {k: t for k, t, _ in _tensors(other)}
        reshaped = False
        for key, t, persistent in _tensors(module):
            full = f"{name}.{key}" if name else key
            if key not in own:
                raise ValueError(f"{full!r} is not in a {type(built).__name__} built from "
                                 "its config")
            if own[key].shape == t.shape:
                continue
            if not persistent:
                raise ValueError(f"buffer {full!r} changed shape but is not saved with the "
                                 "model (non-persistent), so it cannot be rebuilt")
            shapes[full] = (tuple(own[key].shape), tuple(t.shape))
            reshaped = True
        if attrs or reshaped:
            modules[name] = attrs
    return Widths(modules, shapes)


def _uniform(widths: Widths, config: Any) -> tuple[dict[str, list[int]], list[str]]:
    """Config field -> ``[old, new]`` for widths every changed layer agrees on, and a
    description of those the layers disagree on."""
    changes: dict[str, list[int]] = {}
    disagree: list[str] = []
    heads: dict[int, list[str]] = {}
    before_heads: set[int] = set()
    for module, attrs in widths.modules.items():
        for attr, (before, after) in attrs.items():
            if attr in HEAD_ATTRIBUTES and isinstance(after, int):
                heads.setdefault(after, []).append(module)
                before_heads.add(before)
    if len(heads) > 1:
        disagree.append("heads " + ", ".join(
            f"{n} in {m[0]}" + (f" and {len(m) - 1} more" if len(m) > 1 else "")
            for n, m in sorted(heads.items())))
    elif heads and len(before_heads) == 1:
        field = next((f for f in HEAD_FIELDS if isinstance(getattr(config, f, None), int)), None)
        if field is not None:
            changes[field] = [before_heads.pop(), next(iter(heads))]
    for field in FFN_FIELDS:
        value = getattr(config, field, None)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        new = {a for before, after in widths.shapes.values()
               for a, b in zip(after, before, strict=True) if b == value and a != value}
        if len(new) == 1:
            changes[field] = [value, new.pop()]
        elif new:
            disagree.append(f"{field} {sorted(new)}")
    return changes, disagree


def config_changes(model: nn.Module, config: Any, widths: Widths
                   ) -> tuple[dict[str, list[int]] | None, str]:
    """The config fields that express ``widths``, or ``None``; and why, in words.

    Fields are tried only when every changed layer has the same width, and kept only if a
    model built from the changed config has exactly the compacted model's shapes and
    attributes (checked on the ``meta`` device).
    """
    cls = type(model)
    if not widths.modules:
        return {}, "nothing was compacted: the config already describes the model"
    changes, disagree = _uniform(widths, config)
    if disagree:
        return None, ("the layers keep different widths (" + "; ".join(disagree)
                      + "), which one config value per width cannot express")
    shown = ", ".join(f"{k}={v[1]}" for k, v in changes.items()) or "the same config"
    candidate = copy.deepcopy(config)
    for field, (_, new) in changes.items():
        setattr(candidate, field, new)
    try:
        left = describe(model, build(cls, candidate, meta=True))
    except Exception as err:  # a config the model class refuses to build from
        return None, f"{cls.__name__} cannot be built with {shown}: {err}"
    if left.modules:
        name, attrs = next(iter(left.modules.items()))
        what = ", ".join(f"{a} {b} (compacted: {c})" for a, (b, c) in attrs.items()) or \
            ", ".join(f"{k} {b} (compacted: {c})" for k, (b, c) in left.shapes.items()
                      if k.startswith(name))
        return None, (f"a {cls.__name__} built with {shown} differs from the compacted model "
                      f"in {name!r}: {what}")
    return changes, f"the config expresses every width ({shown})"


def apply_widths(model: nn.Module, modules: Mapping[str, Mapping[str, Any]],
                 shapes: Mapping[str, torch.Size]) -> None:
    """Make a model built from the original config compacted again, in place.

    Sets each recorded attribute to its compacted value (head counts on the attention
    modules, ``in_features`` / ``out_features`` on the layers) and gives each tensor of a
    recorded module the shape in ``shapes`` (uninitialised: the weights are loaded next).
    Tied parameters stay tied.

    Raises:
        KeyError: for a recorded module or attribute the model does not have.
        ValueError: for a value of another type than the attribute's, or an attribute
            that compaction does not change (not a public plain value).
    """
    named = dict(model.named_modules())
    for name, attrs in modules.items():
        module = named[name]
        for attr, (_, after) in attrs.items():
            current = vars(module)[attr]
            value = tuple(after) if isinstance(current, tuple) else after
            if not _recordable(attr, current) or type(value) is not type(current):
                raise ValueError(f"{name}.{attr} = {value!r} does not replace {current!r}")
            setattr(module, attr, value)
    replaced: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name not in modules:
            continue
        for key, t, _ in list(_tensors(module)):
            full = f"{name}.{key}" if name else key
            shape = shapes.get(full)
            if shape is None or tuple(shape) == tuple(t.shape):
                continue
            empty = torch.empty(tuple(shape), dtype=t.dtype, device=t.device)
            if isinstance(t, nn.Parameter):
                if id(t) not in replaced:
                    replaced[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad)
                module._parameters[key] = replaced[id(t)]
            else:
                module._buffers[key] = empty
