"""Recipes: validated descriptions of a pruning run, one-shot (:class:`Recipe`) or during
training (:class:`~secateurs.recipes.TrainingRecipe`, on the same shared fields).

Fields are checked when a :class:`Recipe` is built (from Python, a mapping or YAML), before
any model is touched; a wrong one raises :class:`RecipeError` (a ``ValueError``) that names
the field, the value and what is valid. ``to_yaml`` writes every field, defaults
included, so the file alone repeats the run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = ["Calibration", "OwlOptions", "Recipe", "RecipeError", "ReconstructionOptions",
           "read_mapping"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class RecipeError(ValueError):
    """A recipe field with a wrong value; the message names the field, value and what is
    valid."""


class _Strict(BaseModel):
    # Strict: YAML's 1 is not True, "0.5" is not 0.5; unknown fields are errors, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Calibration(_Strict):
    """How calibration text becomes batches.

    Attributes:
        samples: Calibration samples drawn from the file (all of them when it holds fewer).
        sequence_length: Tokens per sample at most (longer samples are truncated).
        batch_size: Samples per batch (samples of similar length are batched together).
        seed: Seed of the draw of samples.
    """

    samples: Annotated[int, Field(ge=1)] = 128
    sequence_length: Annotated[int, Field(ge=1)] = 512
    batch_size: Annotated[int, Field(ge=1)] = 8
    seed: Annotated[int, Field(ge=0)] = 0


class ReconstructionOptions(_Strict):
    """Options of :class:`~secateurs.reconstruction.Reconstruction`."""

    percdamp: Annotated[float, Field(ge=0.0)] = 0.01
    block_size: Annotated[int, Field(ge=1)] = 16
    refine: Annotated[int, Field(ge=0)] = 20


class OwlOptions(_Strict):
    """Outlier-weighted layer-wise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise
    Sparsity (OWL)").

    Attributes:
        threshold: ``M``: a score is an outlier above ``M`` times its block's mean score.
        spread: ``lambda``: block sparsities span ``[s - lambda, s + lambda]``.
    """

    threshold: Annotated[float, Field(gt=0.0)] = 5.0
    spread: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.08


def _nm(text: str) -> tuple[int, int] | None:
    match = _NM.match(text)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def _bad(name: str, value: Any, what: str) -> ValueError:
    return ValueError(f"field {name!r}: got {value!r}: {what}")


def _fraction(name: str, value: Any, top: float, granularity: str) -> float:
    allowed = f"[0, {top:g}]" if top < 1.0 else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or not (0.0 <= value <= top if top < 1.0 else 0.0 <= value < 1.0):
        raise _bad(name, value, f"must be a number in {allowed} (granularity {granularity})")
    return float(value)


class _Pruning(_Strict):
    """What the one-shot and the training recipe share: criterion, sparsity, granularity,
    scope, targets, with their checks, and the YAML round trip."""

    #: Nested sections (field -> model), for naming the valid fields of a wrong one.
    _nested: ClassVar[dict[str, type[BaseModel]]] = {}

    version: Literal[1] = 1
    criterion: str = "contribution"
    criterion_options: dict[str, int | float | str | bool] = Field(default_factory=dict)
    sparsity: float | dict[str, float] | None = 0.5
    granularity: str = "element"
    scope: Literal["row", "layer", "global"] = "row"
    targets: str | list[str] | None = None
    exclude: str | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise RecipeError(describe(error, type(self))) from None

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, value: str) -> str:
        from ..criteria import available_criteria

        if value not in available_criteria():
            raise ValueError(f"unknown criterion {value!r}; registered criteria: "
                             f"{', '.join(available_criteria())}")
        return value

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, value: str) -> str:
        nm = _nm(value)
        if value != "element" and nm is None:
            raise ValueError(f"granularity must be 'element' or 'N:M' such as '2:4', got "
                             f"{value!r}")
        if nm is not None and not 1 <= nm[0] < nm[1]:
            raise ValueError(f"granularity {value!r} needs 1 <= N < M (N kept in every M)")
        return "element" if nm is None else f"{nm[0]}:{nm[1]}"

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_kind(cls, value: Any) -> Any:
        if value is None or isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError("must be null, a regular expression or a list of target names")

    @field_validator("targets", "exclude")
    @classmethod
    def _patterns(cls, value: str | list[str] | None) -> str | list[str] | None:
        for pattern in [value] if isinstance(value, str) else []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {err}") \
                    from None
        if isinstance(value, list) and not value:
            raise ValueError("an empty list names no target; use null for the default")
        return value

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity_kind(cls, value: Any) -> Any:
        if value is None or isinstance(value, dict) or (
                isinstance(value, (int, float)) and not isinstance(value, bool)):
            return float(value) if isinstance(value, int) else value
        raise ValueError("must be a number in [0, 1), null (with N:M: 1 - N/M) or a mapping "
                         "of target-name patterns to numbers")

    @model_validator(mode="before")
    @classmethod
    def _nm_default(cls, data: Any) -> Any:
        # With N:M and no sparsity given, the granularity says it: 1 - N/M.
        if isinstance(data, dict) and "sparsity" not in data \
                and isinstance(data.get("granularity"), str) and _nm(data["granularity"]):
            return {**data, "sparsity": None}
        return data

    def _check_sparsity(self) -> None:
        nm = _nm(self.granularity)
        top = 1.0 - nm[0] / nm[1] if nm else 1.0
        if self.sparsity is None and nm is None:
            raise _bad("sparsity", None, "null means 1 - N/M and needs an N:M granularity; "
                       "give a number in [0, 1)")
        if isinstance(self.sparsity, dict):
            if not self.sparsity:
                raise _bad("sparsity", {}, "an empty mapping names no target")
            for key, value in self.sparsity.items():
                _check_pattern(f"sparsity.{key}", key)
                _fraction(f"sparsity.{key}", value, top, self.granularity)
        elif self.sparsity is not None:
            _fraction("sparsity", self.sparsity, top, self.granularity)

    def _criterion_object(self) -> Any:
        from ..criteria import BNScale, get_criterion

        try:
            crit = get_criterion(self.criterion, **self.criterion_options)
        except (TypeError, ValueError) as err:
            raise _bad("criterion_options", self.criterion_options,
                       f"options of criterion {self.criterion!r} rejected: {err}") from None
        if isinstance(crit, BNScale):
            raise _bad("criterion", self.criterion, "scores whole channel groups only "
                       "(granularity 'channel' with example inputs, which a recipe does not "
                       "take); use l1, l2 or magnitude to score elements")
        return crit

    # -- files -----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "") -> Self:
        """A recipe from a mapping (as YAML reads it).

        Raises:
            RecipeError: for anything but a mapping of valid fields.
        """
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe{source} must be a mapping of fields, got "
                              f"{type(data).__name__}")
        try:
            return cls(**{str(k): v for k, v in data.items()})
        except RecipeError as error:
            raise RecipeError(f"{error}{source}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Self:
        """Read a recipe from a YAML file (fields left out take their defaults).

        Raises:
            RecipeError: for a file that cannot be read or parsed, or a wrong field.
        """
        return cls.from_dict(read_mapping(path), source=f" in {os.fspath(path)!r}")

    @classmethod
    def from_yaml_text(cls, text: str, *, source: str = "") -> Self:
        """A recipe from YAML text (``{}`` or empty text: every default)."""
        return cls.from_dict(_parse(text, source), source=source)

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included, as plain values."""
        return self.model_dump(mode="json")

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """The recipe as YAML (every field); also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (validated like a new recipe)."""
        return type(self).from_dict({**self.to_dict(), **changes})


#: Fields only a training recipe has: a file with them is not a one-shot recipe.
TRAINING_FIELDS = ("schedule", "update_every")


class Recipe(_Pruning):
    """A one-shot pruning run: criterion, sparsity, granularity, targets, reconstruction,
    calibration.

    Attributes:
        version: Format version of the recipe (1).
        criterion: A registered criterion name (``contribution``, ``magnitude``, ...).
        criterion_options: Keyword arguments of the criterion (e.g. ``{p: 2}``).
        sparsity: Fraction of weights removed per target, in ``[0, 1)`` (at most
            ``1 - N/M`` for N:M); ``null`` with N:M means ``1 - N/M``; or a mapping of
            regular expressions to fractions, each target taking the first that matches
            its name (every target must match one).
        allocation: ``uniform`` (every target at ``sparsity``) or ``owl``: per block,
            from its share of outlier scores, with the parameter-weighted mean kept at
            ``sparsity`` (needs a number ``sparsity`` and granularity ``element``).
        owl: Options of the ``owl`` allocation.
        granularity: ``element`` or ``N:M`` (e.g. ``2:4``).
        scope: ``row`` (per output row, as Wanda), ``layer`` or ``global``.
        targets: ``null`` (the default): every linear weight inside the model's repeated
            blocks (``lm_head``, embeddings, poolers excluded), or every linear and
            convolution weight but the output embeddings when there are no blocks; a
            regular expression searched in parameter names; or a list of names.
        exclude: A regular expression; matching targets are left dense.
        reconstruct: ``false``, ``true`` (default options) or reconstruction options.
        sequential: Prune block by block, each on the outputs of the blocks already
            pruned (the layer-wise pipeline; cost linear in depth).
        measure_error: Report each target's relative output error (collects ``X^T X``).
        calibration: Samples, sequence length, batch size and seed of the calibration
            text.
    """

    _nested: ClassVar[dict[str, type[BaseModel]]] = {
        "calibration": Calibration, "owl": OwlOptions, "reconstruct": ReconstructionOptions}

    allocation: Literal["uniform", "owl"] = "uniform"
    owl: OwlOptions = OwlOptions()
    reconstruct: ReconstructionOptions | None = None
    sequential: bool = True
    measure_error: bool = True
    calibration: Calibration = Calibration()

    @model_validator(mode="before")
    @classmethod
    def _one_shot(cls, data: Any) -> Any:
        found = [k for k in TRAINING_FIELDS if isinstance(data, dict) and k in data]
        if found:
            raise ValueError(
                f"field {found[0]!r} belongs to a training recipe "
                "(secateurs.recipes.TrainingRecipe, taken by the Trainer, Lightning and "
                "Accelerate callbacks), which prunes while the model trains; this recipe "
                "prunes once, from calibration data")
        return data

    @field_validator("reconstruct", mode="before")
    @classmethod
    def _reconstruct(cls, value: Any) -> Any:
        if value is True:
            return ReconstructionOptions()
        return None if value is False else value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        self._check_sparsity()
        nm = _nm(self.granularity)
        if self.allocation == "owl" and (nm is not None or not isinstance(self.sparsity, float)):
            raise _bad("allocation", "owl", "sets per-block sparsities around one number: it "
                       f"needs granularity 'element' (got {self.granularity!r}) and a number "
                       f"sparsity (got {self.sparsity!r})")
        if self.scope == "global" and (self.sequential or isinstance(self.sparsity, dict)
                                       or self.allocation == "owl"):
            raise _bad("scope", "global", "ranks every target at once: it needs sequential: "
                       "false, one number sparsity and allocation uniform")
        self.build_criterion()
        return self

    def build_criterion(self) -> Any:
        """The criterion object the recipe names, with its options."""
        crit = self._criterion_object()
        try:
            loss = crit.request is not None and crit.request.loss is not None
        except ValueError as err:  # a criterion that cannot run without a loss says so
            loss, reason = True, f" ({err})"
        else:
            reason = ""
        if loss:
            raise _bad("criterion", self.criterion, f"needs a loss function{reason}, which "
                       "a recipe cannot hold; use contribution or magnitude")
        return crit

    def apply(self, model: Any, batches: Any, *, progress: bool = True) -> Any:
        """Prune ``model`` in place as this recipe says, from calibration ``batches``;
        returns the :class:`~secateurs.oneshot.PruneReport` (see
        :func:`~secateurs.recipes.apply_recipe`)."""
        from .apply import apply_recipe

        return apply_recipe(self, model, batches, progress=progress)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, with numbers read as YAML 1.2 reads them: ``2:4`` stays the text
    ``2:4`` (YAML 1.1 reads it as 124, base 60) and ``1e-3`` is a number."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    key: [r for r in rules if r[0] not in (_INT, _FLOAT)]
    for key, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0b[01_]+|0o?[0-7_]+|0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _parse(text: str, source: str) -> Any:
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain values only
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe{source} is not valid YAML: {err}") from None
    return {} if data is None else data


def read_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields a YAML recipe file sets, unvalidated (to combine with other settings
    before :meth:`Recipe.from_dict`).

    Raises:
        RecipeError: for a file that cannot be read, is not YAML or not a mapping.
    """
    where = f" {os.fspath(path)!r}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe{where}: {err}") from None
    data = _parse(text, f" in{where}")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe{where} must be a mapping of fields, got "
                          f"{type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def _check_pattern(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise _bad(name, pattern, f"not a valid regular expression: {err}") from None


def describe(error: ValidationError, model: type[_Pruning]) -> str:
    """One line per wrong field: its name, the value given and what is valid (the fields
    of ``model``, or of its nested section)."""
    lines = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = model if len(e["loc"]) == 1 else model._nested.get(str(e["loc"][0]))
            valid = f"; valid fields: {', '.join(parent.model_fields)}" if parent else ""
            lines.append(f"unknown field {loc!r}{valid}")
        elif e["type"] == "missing":
            lines.append(f"field {loc!r} is required")
        elif not loc or msg.startswith("field "):
            lines.append(msg)
        else:
            lines.append(f"field {loc!r}: got {e['input']!r}: {msg}")
    return "invalid recipe: " + "; ".join(lines)
