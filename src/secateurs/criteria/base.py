"""The criterion interface and its registry.

A criterion *scores* targets: it returns a tensor shaped like the target, higher meaning
keep. It never selects and never touches masks or weights (Torch-Pruning's
``Importance.__call__(group) -> scores`` split). What else it can do it declares, so no
caller has to probe:

- :attr:`Criterion.request`: the statistics a calibration pass must collect for it
  (``None``: it scores from the weights alone); :meth:`Criterion.fit` takes them;
- :attr:`Criterion.policy`: how its scores are selected (``None``: by count, from the
  pruner's sparsity; dynamic weight clipping declares a
  :class:`~secateurs.selection.Threshold`);
- :class:`GroupCriterion`: scores whole channel groups (one value per unit) itself;
  other criteria's element scores are summed over each unit's slices;
- :meth:`Criterion.bind` / :meth:`Criterion.close`: statistics hooks on the training
  batches while a :class:`~secateurs.Pruner` holds the criterion.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch

from ..calibration import Observed, Request
from ..graph import ChannelGroup
from ..selection import Threshold
from ..targets import Target

C = TypeVar("C", bound="type[Criterion]")

_REGISTRY: dict[str, type[Criterion]] = {}


class Criterion(abc.ABC):
    """Scores targets; higher means keep.

    Class attributes:
        name: The registered name.
        regrows: ``True`` when pruned weights may come back by design (splicing): the
            pruner then neither nests masks nor masks optimizer state.
    """

    name: ClassVar[str] = ""
    regrows: ClassVar[bool] = False

    def bind(self, model: torch.nn.Module, targets: list[Target]) -> None:
        """Called once by the pruner before training; data-driven criteria attach their
        statistics hooks here. The default does nothing."""

    def close(self) -> None:
        """Detach whatever :meth:`bind` attached. The default does nothing."""

    @abc.abstractmethod
    def score(self, target: Target) -> torch.Tensor:
        """Return a float tensor shaped like ``target.param``; higher means keep."""

    @property
    def request(self) -> Request | None:
        """What a calibration pass must collect for this criterion; ``None`` (the default)
        when it scores from the weights alone."""
        return None

    def fit(self, targets: list[Target], observed: Observed) -> None:
        """Take the statistics of ``targets`` from a calibration pass that collected
        :attr:`request`. Only called when :attr:`request` is not ``None``."""
        raise TypeError(f"criterion {self.name!r} scores from the weights alone and takes "
                        "no calibration statistics")

    @property
    def policy(self) -> Threshold | None:
        """How scores are selected: ``None`` (the default) selects by count, from the
        pruner's sparsity; a :class:`~secateurs.selection.Threshold` selects by threshold."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State needed for an exact resume (empty for stateless criteria)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"criterion {self.name!r} holds no state, got keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GroupCriterion(Criterion):
    """A criterion that scores whole channel groups itself: one value per unit.

    Used with ``granularity="channel"`` and example inputs; :meth:`score` is its element
    score for other granularities.
    """

    @abc.abstractmethod
    def score_group(self, group: ChannelGroup, model: torch.nn.Module) -> torch.Tensor:
        """One score per unit of ``group`` (``group.units`` values); higher means keep."""


def register_criterion(name: str) -> Callable[[C], C]:
    """Class decorator adding a criterion to the registry under ``name``."""

    def deco(cls: C) -> C:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"criterion name {name!r} is already registered to "
                             f"{_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_criteria() -> list[str]:
    """The registered criterion names, sorted."""
    return sorted(_REGISTRY)


def get_criterion(spec: str | Criterion, **kwargs: Any) -> Criterion:
    """Return a criterion object from a registered name (built with ``kwargs``) or an object.

    Raises:
        ValueError: for an unknown name; the message lists the registered names.
        TypeError: for anything that is neither a string nor a :class:`Criterion`.
    """
    if isinstance(spec, Criterion):
        if kwargs:
            raise TypeError(f"options {sorted(kwargs)} apply only to a criterion given by name")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"criterion must be a registered name or a Criterion, got "
                        f"{type(spec).__name__}")
    try:
        cls = _REGISTRY[spec]
    except KeyError:
        raise ValueError(
            f"unknown criterion {spec!r}; registered criteria: {', '.join(available_criteria())}"
        ) from None
    return cls(**kwargs)
