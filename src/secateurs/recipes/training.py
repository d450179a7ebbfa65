"""The training recipe: one validated description of pruning while a model trains.

It shares the one-shot :class:`~.schema.Recipe`'s fields (criterion, sparsity, granularity,
scope, targets, exclude) and adds how sparsity grows (``schedule``) and how often masks are
recomputed (``update_every``). The callbacks of :mod:`secateurs.integrations` take it (or its
YAML file) as ``recipe=``; :meth:`TrainingRecipe.pruner` builds the
:class:`~secateurs.Pruner` it describes in a hand-written loop. Every field is checked when
the recipe is built, before any model is touched.

Example (YAML)::

    criterion: magnitude
    sparsity: 0.8            # reached at schedule.end_step, kept after
    schedule: {kind: cubic, initial: 0.0, begin_step: 100, end_step: 2000}
    update_every: 100
    scope: layer
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn

from ..pruner import Pruner
from ..schedules import Cosine, Cubic, Linear, Schedule
from .apply import per_target, recipe_targets
from .schema import _bad, _nm, _Pruning, _Strict

__all__ = ["ScheduleOptions", "TrainingRecipe"]

_KINDS: dict[str, type[Cubic] | type[Linear] | type[Cosine]] = {
    "cubic": Cubic, "linear": Linear, "cosine": Cosine}


class ScheduleOptions(_Strict):
    """How sparsity grows: from ``initial`` (up to ``begin_step``) to the recipe's
    ``sparsity`` (from ``end_step`` on), in optimizer steps.

    Attributes:
        kind: ``cubic`` (Zhu & Gupta 2017: fast first, slow near the end), ``linear`` or
            ``cosine``.
        initial: Sparsity at and before ``begin_step``, in ``[0, 1)``.
        begin_step: First step of the ramp.
        end_step: Step from which the final sparsity holds (``> begin_step``).
    """

    kind: Literal["cubic", "linear", "cosine"] = "cubic"
    initial: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    begin_step: Annotated[int, Field(ge=0)] = 0
    end_step: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _ordered(self) -> ScheduleOptions:
        if self.end_step <= self.begin_step:
            raise _bad("schedule.end_step", self.end_step,
                       f"must be greater than begin_step ({self.begin_step})")
        return self

    def build(self, final: float) -> Schedule:
        """The schedule from ``initial`` to ``final``."""
        return _KINDS[self.kind](initial=self.initial, final=final,
                                 begin_step=self.begin_step, end_step=self.end_step)


class TrainingRecipe(_Pruning):
    """Pruning while a model trains: criterion, final sparsity, schedule, mask updates.

    Attributes:
        version: Format version of the recipe (1).
        criterion: A registered criterion name (``magnitude``, ``contribution``,
            ``taylor``, ``clipping``, ...); statistics come from the training batches.
        criterion_options: Keyword arguments of the criterion.
        sparsity: Final fraction of weights removed per target, in ``[0, 1)`` (at most
            ``1 - N/M`` for N:M; ``null`` with N:M means ``1 - N/M``); or a mapping of
            regular expressions to fractions, each target taking the first that matches.
        schedule: How sparsity grows to ``sparsity``; ``null``: the final sparsity from
            the first mask update.
        update_every: Optimizer steps between mask updates.
        granularity: ``element`` or ``N:M`` (e.g. ``2:4``; then no schedule: N of every M
            are kept from the first update).
        scope: ``layer`` (each target ranked alone), ``row`` or ``global``.
        targets: As in :class:`~.schema.Recipe`: ``null`` (the linear weights inside the
            repeated blocks, or every linear and convolution weight but the output
            embeddings), a regular expression, or a list of names.
        exclude: A regular expression; matching targets stay dense.
    """

    _nested: ClassVar[dict[str, type[BaseModel]]] = {"schedule": ScheduleOptions}
    #: The :class:`~secateurs.Pruner` arguments a training recipe sets.
    PRUNER_ARGUMENTS: ClassVar[frozenset[str]] = frozenset(
        {"sparsity", "criterion", "targets", "scope", "granularity", "update_every"})

    criterion: str = "magnitude"
    scope: Literal["row", "layer", "global"] = "layer"
    schedule: ScheduleOptions | None = None
    update_every: Annotated[int, Field(ge=1)] = 100

    @model_validator(mode="after")
    def _consistent(self) -> TrainingRecipe:
        self._check_sparsity()
        if self.schedule is not None and _nm(self.granularity) is not None:
            raise _bad("schedule", self.schedule.model_dump(),
                       f"granularity {self.granularity!r} keeps N of every M from the first "
                       "mask update, so there is no sparsity to schedule: use null")
        finals = (list(self.sparsity.values()) if isinstance(self.sparsity, dict)
                  else [] if self.sparsity is None else [self.sparsity])
        if self.schedule is not None and any(f < self.schedule.initial for f in finals):
            raise _bad("schedule.initial", self.schedule.initial,
                       f"must not exceed the final sparsity ({min(finals):g})")
        if self.scope == "global" and isinstance(self.sparsity, dict):
            raise _bad("scope", "global", "ranks every target at once: it needs one number "
                       "sparsity")
        self._criterion_object()
        return self

    def pruner_arguments(self, model: nn.Module) -> dict[str, Any]:
        """The :class:`~secateurs.Pruner` arguments this recipe gives on ``model`` (all but
        the model and the optimizer).

        Raises:
            ValueError: when ``targets``/``exclude`` leave no target on ``model``, or a
                target matches no sparsity pattern.
        """
        targets = recipe_targets(self, model)
        finals: float | dict[str, float] | None = (
            per_target(self.sparsity, targets) if isinstance(self.sparsity, dict)
            else self.sparsity)
        sparsity: Any = finals
        if self.schedule is not None:
            schedule = self.schedule
            sparsity = ({n: schedule.build(f) for n, f in finals.items()}
                        if isinstance(finals, dict)
                        else None if finals is None else schedule.build(finals))
        return {"sparsity": sparsity, "criterion": self._criterion_object(),
                "targets": [t.name for t in targets], "scope": self.scope,
                "granularity": self.granularity, "update_every": self.update_every}

    def pruner(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
               **options: Any) -> Pruner:
        """The :class:`~secateurs.Pruner` this recipe describes, on ``model`` and
        ``optimizer`` (``options``: further Pruner arguments the recipe does not set, such
        as ``strict``)."""
        clash = sorted(set(options) & self.PRUNER_ARGUMENTS)
        if clash:
            raise TypeError(f"the recipe sets {', '.join(clash)}: change the recipe, not "
                            "the call")
        return Pruner(model, optimizer=optimizer, **self.pruner_arguments(model), **options)
