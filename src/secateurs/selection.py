"""Selection: scores -> masks, by granularity and scope.

Granularity says how elements are grouped (``element``, ``N:M``, ``channel``); scope says
where one ranking applies (``row``, ``layer``, ``global``). Counts are exact: a layer of
``n`` units at sparsity ``s`` loses ``round(s * n)`` of them, chosen with ``topk`` on the
flattened scores (the core of ``torch.nn.utils.prune.L1Unstructured.compute_mask``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import validation as check
from .schedules import Schedule, as_schedule
from .targets import Target

SCOPES = ("row", "layer", "global")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Granularity:
    """How elements are grouped for selection.

    Attributes:
        kind: ``"element"``, ``"nm"`` (N kept in every M consecutive inputs) or ``"channel"``
            (whole output rows / filters).
        n: N of N:M (kept per group), else 0.
        m: M of N:M (group size), else 0.
    """

    kind: str
    n: int = 0
    m: int = 0

    @property
    def max_sparsity(self) -> float:
        """The largest sparsity this granularity can reach (``1 - N/M`` for N:M)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else 1.0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def parse_granularity(spec: str | Granularity) -> Granularity:
    """Parse ``"element"``, ``"channel"`` or ``"N:M"`` (e.g. ``"2:4"``).

    Raises:
        ValueError: for an unknown name, or N:M with ``N < 1`` or ``N >= M``.
    """
    if isinstance(spec, Granularity):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"granularity must be a string such as 'element', 'channel' or '2:4', "
                        f"got {type(spec).__name__} {spec!r}")
    if spec in ("element", "channel"):
        return Granularity(spec)
    match = _NM.match(spec)
    if match is None:
        raise ValueError(
            f"unknown granularity {spec!r}; valid: 'element', 'channel', or 'N:M' such as '2:4'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"granularity {spec!r} needs 1 <= N < M (N kept in every M), got "
                         f"N={n}, M={m}")
    return Granularity("nm", n, m)


def check_scope(scope: str, granularity: Granularity) -> None:
    """Raise ``ValueError`` unless ``scope`` is valid for ``granularity``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    if scope == "row" and granularity.kind == "channel":
        raise ValueError("scope 'row' ranks inside each output row, which cannot remove whole "
                         "channels; use scope 'layer' or 'global' with granularity 'channel'")


def check_shape(name: str, shape: torch.Size, granularity: Granularity) -> None:
    """Raise ``ValueError`` if a target of ``shape`` cannot take ``granularity``."""
    if granularity.kind == "nm" and shape[1] % granularity.m != 0:
        raise ValueError(
            f"target {name!r} of shape {tuple(shape)} has {shape[1]} input features, not "
            f"divisible by M={granularity.m} of granularity {granularity}; exclude it from "
            f"targets or choose an M that divides {shape[1]}"
        )


SparsitySpec = float | Schedule | Mapping[str, float | Schedule] | None


def resolve_sparsity(names: Sequence[str], sparsity: SparsitySpec, granularity: Granularity,
                     scope: str, *, schedules: bool = True) -> dict[str, Schedule]:
    """Target name -> sparsity schedule, checked against the granularity and scope.

    The one reading of a user's ``sparsity`` for :class:`~secateurs.Pruner` and
    :func:`~secateurs.prune_`.

    Args:
        names: The target names.
        sparsity: A number in ``[0, 1)`` (at most ``1 - N/M`` for N:M), a schedule, a
            mapping naming every target once, or ``None`` (only for N:M: its ``1 - N/M``).
        granularity: The granularity (bounds the sparsity for N:M).
        scope: The scope (``global`` ranks all targets with one sparsity).
        schedules: Whether schedules are accepted (one-shot pruning takes numbers only).

    Raises:
        ArgumentTypeError: for a value that is not a number (or schedule, if accepted).
        ValueError: for a value out of range at any step, a mapping that does not name
            every target once or with scope ``global``, or a missing sparsity.
    """
    what = "a float in [0, 1), a schedule, or a mapping of target names to either" \
        if schedules else "a float in [0, 1) or a mapping of target names to floats"
    if sparsity is None:
        if granularity.kind != "nm":
            raise ValueError(f"sparsity is required ({what}; None only with an N:M "
                             "granularity)")
        sparsity = granularity.max_sparsity
    if isinstance(sparsity, Mapping):
        if scope == "global":
            raise ValueError("per-target sparsities need scope 'layer' or 'row'; scope "
                             "'global' ranks all targets with one sparsity")
        unknown = sorted(set(sparsity) - set(names))
        missing = sorted(set(names) - set(sparsity))
        if unknown or missing:
            raise ValueError(f"sparsity mapping must name each target once: unknown "
                             f"{unknown}, missing {missing}")
        values = {n: sparsity[n] for n in names}
    else:
        values = dict.fromkeys(names, sparsity)
    top = granularity.max_sparsity
    allowed = f"[0, {top:g}]" if top < 1 else "[0, 1)"
    out: dict[str, Schedule] = {}
    for name, value in values.items():
        if schedules and isinstance(value, Schedule):
            low, high = value.bounds()
            if not (low >= 0.0 and (high <= top if top < 1 else high < 1.0)):
                raise ValueError(f"sparsity for {name!r} must stay in {allowed} at every "
                                 f"step (granularity {granularity}); {value!r} spans "
                                 f"[{low:g}, {high:g}]")
            out[name] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise check.ArgumentTypeError(f"sparsity for {name!r} must be {what}, got "
                                          f"{type(value).__name__} {value!r}")
        try:
            out[name] = as_schedule(check.sparsity(f"sparsity for {name!r}", value, top=top))
        except ValueError:
            raise ValueError(f"sparsity for {name!r} must be a number in {allowed} "
                             f"(granularity {granularity}), got {value!r}") from None
    return out


def nm_layout(x: torch.Tensor, m: int) -> torch.Tensor:
    """View a weight ``(out, in, *k)`` as groups of ``m`` consecutive inputs: ``(-1, m)``.

    Groups run along the input dimension, as sparse tensor cores read a GEMM's K dimension.
    """
    return x.movedim(1, -1).reshape(-1, m)


def nm_unlayout(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`nm_layout`."""
    moved = (shape[0], *shape[2:], shape[1])
    return groups.reshape(moved).movedim(-1, 1)


def _units(score: torch.Tensor, granularity: Granularity, scope: str) -> torch.Tensor:
    """Scores of the units that are selected: flat elements, rows, or one per channel."""
    if granularity.kind == "channel":
        per = score.reshape(score.shape[0], -1)
        # Global ranking compares layers of different fan-in: the mean keeps them comparable.
        return per.mean(1) if scope == "global" else per.sum(1)
    if granularity.kind == "nm":
        groups = nm_layout(score, granularity.m)
        top = torch.topk(groups, granularity.n, dim=1).indices
        # Only the M-N lowest of each group are candidates; the N best can never go.
        score = nm_unlayout(groups.scatter(1, top, math.inf), score.shape)
    return score.reshape(score.shape[0], -1) if scope == "row" else score.reshape(-1)


def _keep_lowest_out(units: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask over ``units`` (1-D, or 2-D ranked per row) with the ``k`` lowest False."""
    keep = torch.ones(units.shape, dtype=torch.bool, device=units.device)
    if k > 0:
        idx = torch.topk(units, k, dim=-1, largest=False, sorted=False).indices
        keep.scatter_(-1, idx, False)
    return keep


def _expand(keep: torch.Tensor, shape: torch.Size, granularity: Granularity) -> torch.Tensor:
    if granularity.kind == "channel":
        return keep.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
    return keep.reshape(shape)


def select(
    scores: Mapping[str, torch.Tensor],
    sparsity: Mapping[str, float],
    granularity: Granularity,
    scope: str,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Turn scores into bool masks (``True`` = kept) at the given cumulative sparsities.

    Args:
        scores: Target name -> score shaped like the target; higher means keep.
        sparsity: Target name -> fraction of units to remove (one shared value for
            ``scope="global"``).
        granularity: Unit of selection.
        scope: ``row``, ``layer`` or ``global``.
        previous: Masks to nest in: what they pruned stays pruned, so sparsity never falls.

    Returns:
        Target name -> bool mask shaped like its score.
    """
    check_scope(scope, granularity)
    units = {}
    for name, score in scores.items():
        s = score.detach().float()
        if previous is not None:
            s = s.masked_fill(~previous[name], -math.inf)
        units[name] = _units(s, granularity, scope)
    if scope == "global":
        keeps = _select_global(units, sparsity)
    else:
        keeps = {name: _keep_lowest_out(u, _count(sparsity[name], u)) for name, u in units.items()}
    return {name: _expand(keeps[name], scores[name].shape, granularity) for name in scores}


def select_targets(
    targets: Sequence[Target],
    scores: Mapping[str, torch.Tensor],
    sparsity: Mapping[str, float],
    granularity: Granularity,
    scope: str,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`select` over targets, each seen as rows of outputs (:meth:`Target.rows`), so
    N:M groups and row scope run along the real input dimension of a transposed linear
    layer (GPT-2's ``Conv1D``) too. Scores and masks are shaped like the parameters."""
    by_name = {t.name: t for t in targets}
    rows = {n: by_name[n].rows(s) for n, s in scores.items()}
    before = None if previous is None else {n: by_name[n].rows(previous[n]) for n in scores}
    masks = select(rows, sparsity, granularity, scope, before)
    return {n: by_name[n].rows(m) for n, m in masks.items()}


def _count(s: float, units: torch.Tensor) -> int:
    """Units to remove: ``round(s * n)``, and never fewer than those already at ``-inf``."""
    n = units.shape[-1]
    already = int(torch.isneginf(units).sum(-1).max()) if units.numel() else 0
    return max(round(s * n), already)


def _select_global(units: Mapping[str, torch.Tensor],
                   sparsity: Mapping[str, float]) -> dict[str, torch.Tensor]:
    values = set(sparsity.values())
    if len(values) != 1:
        raise ValueError(f"scope 'global' ranks all targets together and needs one sparsity, "
                         f"got {sorted(values)}")
    flat = torch.cat([u.reshape(-1) for u in units.values()])
    keep = _keep_lowest_out(flat, _count(values.pop(), flat))
    sizes = [u.numel() for u in units.values()]
    return dict(zip(units, keep.split(sizes), strict=True))


@dataclass(frozen=True)
class Threshold:
    """A selection policy by threshold with hysteresis, instead of by count.

    At step ``t`` a kept unit is pruned when its score is below ``low = threshold(t)``; a
    pruned unit returns when its score reaches ``high = low * (1 + margin)``
    (:func:`select_by_threshold`). Dynamic weight clipping declares this policy.

    Attributes:
        threshold: A constant or a schedule of the step, ``>= 0``.
        margin: Relative gap between the pruning and the regrowth thresholds, ``>= 0``.
    """

    threshold: float | Schedule
    margin: float = 0.0

    def bounds(self, step: int) -> tuple[float, float]:
        """``(prune_below, regrow_at_or_above)`` at ``step``."""
        low = float(as_schedule(self.threshold)(step))
        return low, low * (1.0 + self.margin)

    def select(self, scores: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor],
               step: int) -> dict[str, torch.Tensor]:
        """Masks at ``step`` from ``scores`` and the ``previous`` masks."""
        low, high = self.bounds(step)
        return select_by_threshold(scores, previous, low, high)


def select_by_threshold(
    scores: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor],
    low: float,
    high: float,
) -> dict[str, torch.Tensor]:
    """Masks with hysteresis: prune below ``low``; bring back at or above ``high``.

    ``mask = (score >= high) | (previous & (score >= low))`` (splicing, Guo et al. 2016).
    """
    if not 0 <= low <= high:
        raise ValueError(f"thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    return {name: (s >= high) | (previous[name] & (s >= low)) for name, s in scores.items()}


def select_units(
    scores: Mapping[str, torch.Tensor],
    sparsity: Mapping[str, float],
    scope: str,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep vectors over groups of units (channels, neurons, heads), one value per unit.

    Each group loses ``round(s * n)`` of its ``n`` units, the lowest-scored, and always
    keeps at least one. With ``scope="global"`` one ranking runs over every group, each
    group's scores divided by their mean over its kept units so that groups of different
    sizes and scales compare (Torch-Pruning's ``normalizer="mean"``).

    Args:
        scores: Group name -> 1-D unit scores; higher means keep.
        sparsity: Group name -> fraction of units to remove (one shared value for
            ``scope="global"``).
        scope: ``layer`` (rank within each group) or ``global``.
        previous: Group name -> earlier keep vector; what it removed stays removed.

    Returns:
        Group name -> bool keep vector (``True`` = kept).
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope {scope!r} cannot rank whole channels; valid: 'layer', 'global'")
    units: dict[str, torch.Tensor] = {}
    for name, score in scores.items():
        s = score.detach().double().reshape(-1)
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores of channel group {name!r} hold NaN or Inf values")
        kept = torch.ones_like(s, dtype=torch.bool) if previous is None else previous[name]
        if scope == "global":
            mean = s[kept].mean() if bool(kept.any()) else s.new_ones(())
            s = s / mean if float(mean) > 0 else s
        units[name] = s.masked_fill(~kept, -math.inf)
    if scope == "global":
        keeps = _select_global(units, sparsity)
    else:
        keeps = {name: _keep_lowest_out(u, min(_count(sparsity[name], u), u.numel() - 1))
                 for name, u in units.items()}
    for name, keep in keeps.items():
        if keep.numel() and not bool(keep.any()):
            keep[int(torch.argmax(units[name]))] = True
    return keeps
