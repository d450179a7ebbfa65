"""Which parameters are under management: resolving the ``targets`` argument.

A *target* is a parameter named by its fully qualified name (``features.0.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

from torch import nn

TargetSpec = Union[
    None, str, "re.Pattern[str]", Sequence[str], Callable[[str, nn.Module], bool]
]

_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


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
        chosen = [t for t in candidates
                  if isinstance(t.module, _DEFAULT_TYPES) and t.param_name == "weight"]
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
        chosen = _by_names(candidates, targets)
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


def _by_names(candidates: list[Target], names: Sequence[str]) -> list[Target]:
    by_param = {t.name: t for t in candidates}
    by_module = {t.module_name: t for t in candidates if t.param_name == "weight"}
    wanted: set[str] = set()
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"target names must be strings, got {n!r}")
        hit = by_param.get(n) or by_module.get(n)
        if hit is None:
            close = [c for c in by_param if n.split(".")[0] in c][:5] or list(by_param)[:5]
            raise ValueError(
                f"target {n!r} is neither a parameter with 2+ dimensions nor a module with "
                f"such a weight; valid names include: {', '.join(close)}"
            )
        wanted.add(hit.name)
    return [t for t in candidates if t.name in wanted]
