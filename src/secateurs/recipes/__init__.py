"""Recipes: validated descriptions of a pruning run, in YAML or Python: one-shot
(:class:`Recipe`) or while training (:class:`TrainingRecipe`).

Example:
    >>> recipe = Recipe(sparsity=0.5, criterion="contribution", reconstruct=True)
    >>> recipe = Recipe.from_yaml("recipe.yaml")        # the same, from a file
    >>> report = recipe.apply(model, batches)           # prune_ with everything it says
    >>> recipe.to_yaml("out/recipe.yaml")               # every field: the run repeats

A wrong field raises :class:`RecipeError` (a ``ValueError``) naming the field, the value
and what is valid, before any model is touched. ``allocation: owl`` sets per-block
sparsities from outlier ratios (:mod:`.owl`).
"""

from __future__ import annotations

from .apply import apply_recipe, default_targets, recipe_sparsity, recipe_targets
from .owl import outlier_ratios, owl_allocation, owl_sparsity
from .run import PruneRun, prune_checkpoint
from .schema import (
    Calibration,
    OwlOptions,
    Recipe,
    RecipeError,
    ReconstructionOptions,
    read_mapping,
)
from .training import ScheduleOptions, TrainingRecipe

__all__ = [
    "Calibration",
    "OwlOptions",
    "PruneRun",
    "Recipe",
    "RecipeError",
    "ReconstructionOptions",
    "ScheduleOptions",
    "TrainingRecipe",
    "apply_recipe",
    "default_targets",
    "outlier_ratios",
    "owl_allocation",
    "owl_sparsity",
    "prune_checkpoint",
    "read_mapping",
    "recipe_sparsity",
    "recipe_targets",
]
