"""What every framework callback holds: how to build the pruner, the pruner once built, the
controller it feeds, and the figures it logs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..pruner import Pruner, SparsitySpec
from ..recipes import TrainingRecipe
from ..schedules import Schedule


def as_training_recipe(recipe: Any) -> TrainingRecipe:
    """``recipe`` as a :class:`~secateurs.recipes.TrainingRecipe`: one already, a mapping of
    its fields, or the path of its YAML file.

    Raises:
        RecipeError: for a wrong field or a file that cannot be read.
        TypeError: for anything else.
    """
    if isinstance(recipe, TrainingRecipe):
        return recipe
    if isinstance(recipe, Mapping):
        return TrainingRecipe.from_dict(dict(recipe))
    if isinstance(recipe, (str, os.PathLike)):
        return TrainingRecipe.from_yaml(recipe)
    raise TypeError(f"recipe must be a TrainingRecipe, a mapping of its fields or the path "
                    f"of its YAML file, got {type(recipe).__name__}")


def make_pruner(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                sparsity: SparsitySpec, criterion: Any, options: Mapping[str, Any],
                recipe: TrainingRecipe | None) -> Pruner:
    """The pruner the recipe describes, or the one the arguments do."""
    if recipe is not None:
        return recipe.pruner(model, optimizer, **options)
    return Pruner(model, sparsity, criterion, optimizer=optimizer, **options)


class Session:
    """A pruner built when training starts, stepped after each optimizer step.

    Args:
        sparsity: The pruner's ``sparsity`` (a float, a schedule, a mapping).
        criterion: The pruner's ``criterion`` (``None``: ``magnitude``).
        controller: Fed the evaluation metrics (anything with ``observe(metrics)``, e.g.
            :class:`~secateurs.controllers.Budget` or
            :class:`~secateurs.controllers.Plateau`); one with ``attach(pruner)`` (a
            ``Budget``) is attached to the pruner when it is built. Saved and restored with
            the pruner (``state_dict`` / ``load_state_dict``).
        options: Further keyword arguments of :class:`~secateurs.Pruner` (``scope``,
            ``granularity``, ``update_every``, ``targets``, ...).
        recipe: Instead of ``sparsity``, ``criterion`` and the options a recipe sets: a
            :class:`~secateurs.recipes.TrainingRecipe`, a mapping of its fields or the path
            of its YAML file (checked now, before training starts).
    """

    def __init__(self, sparsity: SparsitySpec, criterion: Any, controller: Any,
                 options: Mapping[str, Any], recipe: Any = None) -> None:
        if controller is not None and not callable(getattr(controller, "observe", None)):
            raise TypeError(f"controller must have an observe(metrics) method (a Budget, a "
                            f"Plateau), got {type(controller).__name__}")
        if "optimizer" in options:
            raise TypeError("the optimizer is the framework's: do not pass optimizer=")
        self.recipe = None if recipe is None else as_training_recipe(recipe)
        if self.recipe is not None:
            given = [k for k, v in (("sparsity", sparsity), ("criterion", criterion))
                     if v is not None]
            given += sorted(set(options) & TrainingRecipe.PRUNER_ARGUMENTS)
            if given:
                raise TypeError(f"the recipe sets {', '.join(given)}: give either recipe= or "
                                "the pruner's arguments, not both")
            if isinstance(getattr(controller, "sparsity", None), Schedule):
                raise TypeError(
                    f"a {type(controller).__name__} steers sparsity through its own schedule, "
                    "which the pruner must read, and the recipe gives the pruner another: "
                    "give the pruner's arguments (sparsity=controller.sparsity) instead")
        self.sparsity, self.controller = sparsity, controller
        self.criterion = "magnitude" if criterion is None else criterion
        self.options = dict(options)
        self.pruner: Pruner | None = None
        self._pending: Mapping[str, Any] | None = None  # a state restored before the build
        self._logged: tuple[int, float] | None = None  # (mask version, realised sparsity)

    def build(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Pruner:
        """Build the pruner (and attach the controller), then restore a pending state. A
        pruner built before (an earlier ``train()``) is closed first: its hooks go."""
        if self.pruner is not None:
            self.pruner.close()
        self.pruner = make_pruner(model, optimizer, self.sparsity, self.criterion,
                                  self.options, self.recipe)
        attach = getattr(self.controller, "attach", None)
        if callable(attach):
            attach(self.pruner)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)
        return self.pruner

    def step(self) -> bool:
        """``pruner.step()``: right after an optimizer step."""
        return self.built().step()

    def built(self) -> Pruner:
        if self.pruner is None:
            raise RuntimeError("the pruner is built when training starts; no training has")
        return self.pruner

    def logs(self) -> dict[str, float]:
        """``sparsity`` (realised, over all targets) and ``target_sparsity`` (the schedule's
        now, weighted by target size), for the framework's logger."""
        pruner = self.built()
        version = pruner.masks.version
        if self._logged is None or self._logged[0] != version:
            # The realised sparsity moves only when the masks do: no pass over the weights
            # at every log.
            self._logged = (version, pruner.sparsity())
        out = {"sparsity": self._logged[1]}
        target = pruner.target_sparsity()
        if target:
            sizes = {t.name: t.param.numel() for t in pruner.targets}
            total = sum(sizes[n] for n in target)
            out["target_sparsity"] = sum(s * sizes[n] for n, s in target.items()) / total
        return out

    def observe(self, metrics: Mapping[str, Any]) -> None:
        """Feed evaluation metrics to the controller, if there is one."""
        if self.controller is not None:
            self.controller.observe({k: float(v) for k, v in metrics.items()
                                     if isinstance(v, (int, float, torch.Tensor))})

    def state_dict(self) -> dict[str, Any]:
        """The pruner's state and the controller's."""
        state: dict[str, Any] = {"pruner": self.built().state_dict()}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (kept until the pruner is built, if it is not yet)."""
        if self.pruner is None:
            self._pending = state
            return
        self.pruner.load_state_dict(state["pruner"])
        if self.controller is not None and "controller" in state:
            self.controller.load_state_dict(state["controller"])
