"""Applying a :class:`~.schema.Recipe` to a model: its targets, its sparsities (OWL
included), then :func:`~secateurs.prune_`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from torch import nn

from ..calibration import Batch, repeated_blocks
from ..oneshot import PruneReport, prune_
from ..reconstruction import Reconstruction
from ..targets import Target, resolve_targets
from .owl import owl_sparsity

if TYPE_CHECKING:
    from .schema import Recipe
    from .training import TrainingRecipe

__all__ = ["apply_recipe", "default_targets", "recipe_sparsity", "recipe_targets"]


def _output_embeddings(model: nn.Module) -> set[int]:
    """Parameters of the output embeddings (``lm_head``), tied or not."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()


def default_targets(model: nn.Module) -> list[Target]:
    """Every linear weight inside the repeated blocks; without blocks, every linear and
    convolution weight but the output embeddings and any module named ``lm_head``."""
    candidates = resolve_targets(model)
    blocks = repeated_blocks(model)
    if blocks is not None:
        inside = [t for t in candidates
                  if any(t.module_name == b or t.module_name.startswith(b + ".")
                         for b in blocks.names)]
        if inside:
            return inside
    head = _output_embeddings(model)
    chosen = [t for t in candidates if id(t.param) not in head
              and t.module_name.split(".")[-1] != "lm_head"]
    if not chosen:
        raise ValueError("the model has no linear or convolution weight outside its output "
                         "embeddings; name targets in the recipe")
    return chosen


def recipe_targets(recipe: Recipe | TrainingRecipe, model: nn.Module) -> list[Target]:
    """The targets a recipe names on ``model`` (see ``Recipe.targets`` and ``exclude``).

    Raises:
        ValueError: when they match nothing, or ``exclude`` leaves nothing.
    """
    targets = default_targets(model) if recipe.targets is None \
        else resolve_targets(model, recipe.targets)
    if recipe.exclude is not None:
        pattern = re.compile(recipe.exclude)
        kept = [t for t in targets if not pattern.search(t.name)]
        if not kept:
            raise ValueError(f"recipe field 'exclude': {recipe.exclude!r} excludes every "
                             f"target ({len(targets)}, e.g. {targets[0].name!r})")
        targets = kept
    return targets


def recipe_sparsity(recipe: Recipe, model: nn.Module, targets: list[Target],
                    batches: Iterable[Batch], *, progress: bool = True
                    ) -> float | dict[str, float] | None:
    """What :func:`~secateurs.prune_` takes as ``sparsity``: the number, per-target values
    from the recipe's patterns, or OWL's per-block values (one pass over ``batches``).

    Raises:
        ValueError: for a target that no sparsity pattern matches.
    """
    if recipe.allocation == "owl":
        assert isinstance(recipe.sparsity, float)
        return owl_sparsity(model, batches, targets, recipe.sparsity,
                            threshold=recipe.owl.threshold, spread=recipe.owl.spread,
                            progress=progress)
    if not isinstance(recipe.sparsity, dict):
        return recipe.sparsity
    return per_target(recipe.sparsity, targets)


def per_target(patterns: Mapping[str, float], targets: list[Target]) -> dict[str, float]:
    """Target name -> the value of the first of ``patterns`` (regular expressions searched
    in the name) that matches it.

    Raises:
        ValueError: for a target that no pattern matches.
    """
    compiled = [(re.compile(k), v) for k, v in patterns.items()]
    out: dict[str, float] = {}
    for t in targets:
        hit = next((v for p, v in compiled if p.search(t.name)), None)
        if hit is None:
            raise ValueError(f"recipe field 'sparsity': no pattern of {list(patterns)} "
                             f"matches target {t.name!r}; add one (e.g. '.': 0.5 for the "
                             "rest)")
        out[t.name] = hit
    return out


def apply_recipe(recipe: Recipe, model: nn.Module, batches: Iterable[Batch], *,
                 progress: bool = True) -> PruneReport:
    """Prune ``model`` in place as ``recipe`` says, from calibration ``batches``.

    Everything is checked (targets, sparsities, shapes, batches) before any weight
    changes; see :func:`~secateurs.prune_`.
    """
    batches = list(batches)
    targets = recipe_targets(recipe, model)
    sparsity = recipe_sparsity(recipe, model, targets, batches, progress=progress)
    options = recipe.reconstruct
    reconstruct = False if options is None else Reconstruction(**options.model_dump())
    return prune_(model, sparsity, recipe.build_criterion(), batches,
                  granularity=recipe.granularity, scope=recipe.scope,
                  targets=[t.name for t in targets], reconstruct=reconstruct,
                  sequential=recipe.sequential, measure_error=recipe.measure_error,
                  progress=progress)
