"""Which parameters are under management: resolving the ``targets`` argument.

A *target* is a parameter named by its fully qualified name (``features.0.weight``).

Selection, input statistics and reconstruction see a weight as rows of outputs and columns
of inputs (``nn.Linear``'s ``(out, in)``). A layer that stores its weight the other way
round, as Hugging Face's GPT-2 ``Conv1D`` does (``(in, out)``, ``y = x @ W + b``), is a
*transposed* linear layer: :meth:`Target.rows` turns its weight (and its scores and masks)
into ``(out, in)`` and back. Register other such layer types with
:func:`register_transposed`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import nn

TargetSpec = Union[
    None, str, "re.Pattern[str]", Sequence[str], Callable[[str, nn.Module], bool]
]

_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
_TRANSPOSED: set[type[nn.Module]] = set()


def register_transposed(module_type: type[nn.Module]) -> None:
    """Declare a linear layer type whose ``weight`` is stored ``(in, out)``.

    Its weight becomes a default target, and N:M groups, row scope, input statistics,
    reconstruction and channel groups run along its real input dimension.
    """
    _TRANSPOSED.add(module_type)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile(module)`` wraps (its ``OptimizedModule`` holds it as
    ``_orig_mod``, which would prefix every name), or ``model`` itself. Recognised without
    importing ``torch._dynamo``."""
    inner = getattr(model, "_orig_mod", None)
    while type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        model, inner = inner, getattr(inner, "_orig_mod", None)
    return model


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer whose weight is stored ``(in, out)``:
    a registered type, or Hugging Face's ``Conv1D`` (recognised without importing
    ``transformers``)."""
    cls = type(module)
    if any(issubclass(cls, t) for t in _TRANSPOSED):
        return True
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.")
               for c in cls.__mro__)


@dataclass(frozen=True, eq=False)
class Target:
    """One managed parameter and the module that owns it.

    Attributes:
        name: Fully qualified parameter name, e.g. ``features.0.weight``.
        module_name: Fully qualified name of the owning module, e.g. ``features.0``.
        module: The owning module.
        param_name: The parameter's name inside its module, e.g. ``weight``.
    """

    name: str
    module_name: str
    module: nn.Module
    param_name: str

    @property
    def param(self) -> nn.Parameter:
        """The managed parameter (looked up each time, so module surgery stays visible)."""
        p = getattr(self.module, self.param_name)
        assert isinstance(p, nn.Parameter)
        return p

    @property
    def transposed(self) -> bool:
        """Whether the parameter is the ``(in, out)`` weight of a transposed linear layer."""
        return self.param_name == "weight" and is_transposed_linear(self.module)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, shaped like the parameter, seen as ``(out, in, ...)``: the transpose for a
        transposed linear layer, ``x`` itself otherwise. Applying it twice gives ``x``."""
        return x.t() if self.transposed else x

    @property
    def row_shape(self) -> torch.Size:
        """The parameter's shape seen as ``(out, in, ...)``."""
        return self.rows(self.param.detach()).shape


def _candidates(model: nn.Module) -> list[Target]:
    """Every parameter with at least two dimensions, once each (tied weights counted once)."""
    seen: set[int] = set()
    out: list[Target] = []
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if p.dim() < 2 or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{module_name}.{param_name}" if module_name else param_name
            out.append(Target(name, module_name, module, param_name))
    return out


def _describe(spec: object) -> str:
    if isinstance(spec, re.Pattern):
        return f"re.compile({spec.pattern!r})"
    return repr(spec)


def resolve_targets(model: nn.Module, targets: TargetSpec = None) -> list[Target]:
    """Resolve a ``targets`` argument to the list of managed parameters, in model order.

    Args:
        model: The model whose parameters are managed.
        targets: ``None`` for every ``nn.Linear`` and ``nn.ConvNd`` weight; a regular
            expression (``str`` or compiled) searched in each parameter's full name; a
            list of parameter names (``features.0.weight``) or module names
            (``features.0``, meaning its ``weight``); or a callable
            ``(module_name, module) -> bool`` choosing modules whose ``weight`` is managed.

    Returns:
        The targets, in the order of ``model.named_modules()``.

    Raises:
        ValueError: if a listed name does not exist, or nothing matches.
        TypeError: if ``targets`` is of none of the accepted types.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    candidates = _candidates(model)
    if targets is None:
        chosen = [t for t in candidates if t.param_name == "weight"
                  and (isinstance(t.module, _DEFAULT_TYPES) or t.transposed)]
    elif isinstance(targets, (str, re.Pattern)):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"targets={_describe(targets)} is not a valid regular expression: "
                             f"{err}") from None
        chosen = [t for t in candidates if pattern.search(t.name)]
    elif callable(targets):
        chosen = [t for t in candidates
                  if t.param_name == "weight" and targets(t.module_name, t.module)]
    elif isinstance(targets, Sequence):
        chosen = _by_names(model, candidates, targets)
    else:
        raise TypeError(
            "targets must be None, a regular expression, a list of names or a callable "
            f"(name, module) -> bool; got {type(targets).__name__}"
        )
    if not chosen:
        names = ", ".join(t.name for t in candidates[:8]) or "(none: no parameter has 2+ dims)"
        raise ValueError(
            f"targets={_describe(targets)} matched no parameter of the model; "
            f"parameters that can be targets include: {names}"
        )
    return chosen


def _tied(model: nn.Module) -> dict[str, str]:
    """Alias -> canonical name, for parameters shared by several modules (the tied
    ``lm_head`` of a causal LM is ``transformer.wte.weight``); module names included."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if id(p) not in first:
                first[id(p)] = name
            elif first[id(p)] != name:
                out[name] = first[id(p)]
                if param_name == "weight":
                    out.setdefault(module_name, first[id(p)])
    return out


def _by_names(model: nn.Module, candidates: list[Target], names: Sequence[str]
              ) -> list[Target]:
    by_param = {t.name: t for t in candidates}
    by_module = {t.module_name: t for t in candidates if t.param_name == "weight"}
    tied = _tied(model)
    wanted: set[str] = set()
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"target names must be strings, got {n!r}")
        hit = by_param.get(n) or by_module.get(n)
        if hit is None and n in tied:
            raise ValueError(f"target {n!r} is tied to {tied[n]!r} (one tensor, counted once): "
                             f"name {tied[n]!r} to prune it, knowing that every layer sharing "
                             "it changes, or untie the weights first")
        if hit is None:
            close = [c for c in by_param if n.split(".")[0] in c][:5] or list(by_param)[:5]
            raise ValueError(
                f"target {n!r} is neither a parameter with 2+ dimensions nor a module with "
                f"such a weight; valid names include: {', '.join(close)}"
            )
        wanted.add(hit.name)
    return [t for t in candidates if t.name in wanted]
