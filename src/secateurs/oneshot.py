"""One-shot pruning with calibration data: :func:`prune_`.

Calibration collects input statistics, a criterion scores, :func:`secateurs.selection.select`
chooses the masks, and, optionally, :mod:`secateurs.reconstruction` updates the kept
weights. In sequential mode the targets are pruned stage by stage (by default one repeated
block, such as ``encoder.layer.3``, per stage), each stage calibrated on the outputs of the
stages already pruned, as SparseGPT and Wanda do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from . import validation as check
from .calibration import (
    Batch,
    InputStats,
    Request,
    call_order,
    check_batches,
    model_device,
    observe,
    to_device,
)
from .criteria import Criterion, get_criterion
from .pruner import Pruner, kept_table
from .reconstruction import Reconstruction, relative_error
from .selection import (
    Granularity,
    check_scope,
    check_shape,
    parse_granularity,
    resolve_sparsity,
    select_targets,
)
from .tables import text_table
from .targets import Target, TargetSpec, resolve_targets

StageFn = Callable[[str], str]


def block_of(module_name: str) -> str:
    """Default stage of a target: its module path up to the first numeric component.

    ``encoder.layer.3.attention.self.query`` -> ``encoder.layer.3``; ``features.0`` ->
    ``features.0``; a path without one (``fc1``) is its own stage.
    """
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return module_name


@dataclass(frozen=True)
class TargetReport:
    """One target of a :class:`PruneReport`.

    Attributes:
        name: Target name.
        shape: Weight shape.
        sparsity: Realised fraction of pruned weights.
        relative_error: ``||(W - W') X||_F^2 / ||W X||_F^2`` on the layer's calibration
            inputs ``X`` (``None`` when ``X^T X`` was not collected).
        stage: The stage it was pruned in (``""`` when not sequential).
    """

    name: str
    shape: tuple[int, ...]
    sparsity: float
    relative_error: float | None
    stage: str


@dataclass
class PruneReport:
    """What :func:`prune_` did: per-target results, masks and time.

    Attributes:
        targets: One :class:`TargetReport` per target, in model order.
        masks: Target name -> bool mask (``True`` = kept), e.g. to keep pruned weights at
            zero in later training with :class:`~secateurs.Pruner`.
        seconds: Wall time of the whole call.
        calibration_seconds: Time in calibration passes and scoring.
        reconstruction_seconds: Time in weight reconstruction.
        passes: Calibration passes over the batches (one per stage when sequential).
        kept: Target name -> why its output channels stay at full width (channel
            granularity: model outputs, normalised widths, couplings that cannot be
            resolved safely).
    """

    targets: list[TargetReport] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    calibration_seconds: float = 0.0
    reconstruction_seconds: float = 0.0
    passes: int = 0
    kept: dict[str, str] = field(default_factory=dict)

    def sparsity(self) -> float:
        """Fraction of pruned weights over all targets."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def __str__(self) -> str:
        cells = [[r.name, "x".join(map(str, r.shape)), f"{r.sparsity:.1%}",
                  "-" if r.relative_error is None else f"{r.relative_error:.4f}"]
                 for r in self.targets]
        lines = [text_table(["target", "shape", "sparsity", "rel. error"], cells, left=2)]
        lines.append(f"total sparsity {self.sparsity():.1%}; {self.seconds:.2f} s "
                     f"(calibration {self.calibration_seconds:.2f} s in {self.passes} passes, "
                     f"reconstruction {self.reconstruction_seconds:.2f} s)")
        if self.kept:
            lines += ["", kept_table(self.kept)]
        return "\n".join(lines)


@dataclass
class _Plan:
    """Everything :func:`prune_` validated before touching the model."""

    model: nn.Module
    targets: list[Target]
    sparsity: dict[str, float]
    criterion: Criterion
    batches: Iterable[Batch] | None
    granularity: Granularity
    scope: str
    reconstruct: Reconstruction | None
    request: Request
    progress: bool

    @property
    def hessian(self) -> bool:
        return self.request.hessian


def prune_(
    model: nn.Module,
    sparsity: float | Mapping[str, float] | None = None,
    criterion: str | Criterion = "contribution",
    calibration: Iterable[Batch] | None = None,
    *,
    granularity: str | Granularity = "element",
    scope: str = "row",
    targets: TargetSpec = None,
    reconstruct: bool | Reconstruction = False,
    sequential: bool = False,
    stages: StageFn | None = None,
    measure_error: bool = False,
    progress: bool = True,
    strict: bool = False,
) -> PruneReport:
    """Prune ``model`` in place, in one shot, from calibration data.

    Args:
        model: The model; it stays a plain ``nn.Module`` with the same ``state_dict`` keys.
        sparsity: Fraction of weights to remove, in ``[0, 1)`` (at most ``1 - N/M`` for
            N:M, where ``None`` means exactly that), or a mapping target name -> fraction.
        criterion: A registered name (``contribution``, ``taylor``, ``magnitude``, ...) or a
            :class:`~secateurs.criteria.Criterion`, e.g. ``Contribution(p=1)``.
        calibration: Iterable of batches (tensors, tuples of positional arguments, or dicts
            of keyword arguments). Needed by data criteria, reconstruction and error
            measurement. A one-pass iterator is kept in a list when several passes are run.
        granularity: ``element``, ``N:M`` (e.g. ``"2:4"``) or ``channel``: whole channel
            groups (a neuron or filter with its bias, norm and the input columns of its
            readers; model outputs are never pruned), traced on the first calibration
            batch, with scope ``layer`` or ``global``; the masks of the coupled parameters
            are applied in place, ``masks`` of the report holds the targets'.
        scope: ``row`` (per output row, as Wanda), ``layer`` or ``global``.
        targets: See :func:`secateurs.targets.resolve_targets`.
        reconstruct: After each layer's mask is chosen, update its kept weights to minimise
            the layer's output error on the calibration inputs (SparseGPT's OBS update, then
            conjugate gradients): ``True`` for the default
            :class:`~secateurs.reconstruction.Reconstruction`, or one with other options.
        sequential: Prune stage by stage, each stage calibrated on the outputs of the stages
            already pruned (one calibration pass per stage, each ending where the next stage
            begins). Off by default: on a 6-block pretrained encoder it kept the same
            fidelity as one pass, at a higher cost (``benchmarks/adaptive.py``).
        stages: Module name -> stage key; targets sharing a key form one stage. Default:
            :func:`block_of`. Stages run in the order the model first calls them.
        measure_error: Collect ``X^T X`` to report each layer's relative output error even
            without reconstruction (always reported with it).
        progress: Show progress bars.
        strict: With granularity ``channel``, refuse targets whose channel coupling cannot
            be resolved safely instead of keeping their channels (``kept`` of the report
            says which are kept, and why).

    Returns:
        A :class:`PruneReport`.

    Raises:
        ValueError: for bad arguments, NaN or Inf weights, empty calibration, a batch on
            which the model raises, or (granularity ``channel``) no target with channels
            that can go, or with ``strict`` a coupling that cannot be resolved; raised
            before any weight is changed (in sequential mode the stages already written are
            restored).
    """
    start = time.perf_counter()
    check.optional(check.callable_, "stages", stages, what="a callable (module name) -> stage key")
    check.boolean("strict", strict)
    rec = Reconstruction() if reconstruct is True else reconstruct or None
    check.optional(check.instance, "reconstruct", rec, types=Reconstruction,
                   what="a bool or a Reconstruction")
    plan = _plan(model, sparsity, criterion, calibration, granularity, scope, targets, rec,
                 rec is not None or measure_error, progress)
    if sequential and scope == "global":
        raise ValueError("scope 'global' ranks all targets at once, but sequential pruning "
                         "chooses masks stage by stage; use scope 'row' or 'layer', or "
                         "sequential=False")
    if plan.granularity.kind == "channel":
        return _prune_channels(plan, sequential, start, strict)
    groups = _stages(plan, stages or block_of) if sequential else {"": plan.targets}
    passes = len(groups) * max(plan.request.passes, 1)
    plan.batches = _replayable(plan.batches, passes)
    report = PruneReport()
    saved: dict[str, torch.Tensor] = {}
    keys = list(groups)
    try:
        for i, key in enumerate(tqdm(keys, desc="prune_", disable=not progress or len(keys) == 1,
                                     leave=False)):
            later = [t for k in keys[i + 1:] for t in groups[k]]
            new = _prune_stage(plan, key, groups[key], later, report)
            saved.update({t.name: t.param.detach().clone() for t in groups[key]})
            _write(groups[key], new)
    except BaseException:
        _write([t for t in plan.targets if t.name in saved], saved)
        raise
    rank = {t.name: i for i, t in enumerate(plan.targets)}
    report.targets.sort(key=lambda r: rank[r.name])
    report.masks = {r.name: report.masks[r.name] for r in report.targets}
    report.seconds = time.perf_counter() - start
    return report


def _plan(model: nn.Module, sparsity: float | Mapping[str, float] | None,
          criterion: str | Criterion, calibration: Iterable[Batch] | None,
          granularity: str | Granularity, scope: str, targets: TargetSpec,
          reconstruct: Reconstruction | None, hessian: bool, progress: bool) -> _Plan:
    resolved = resolve_targets(model, targets)
    gran = parse_granularity(granularity)
    check_scope(scope, gran)
    for t in resolved:
        check_shape(t.name, t.row_shape, gran)
        if not bool(torch.isfinite(t.param).all()):
            raise ValueError(f"target {t.name!r} holds NaN or Inf values; masks cannot be "
                             "ranked on them (nothing was changed)")
    crit = get_criterion(criterion)
    request = Request(hessian=hessian).merge(crit.request)
    needs = [f"criterion {crit.name!r}"] if crit.request is not None else []
    needs += ["reconstruction"] if reconstruct is not None else []
    needs += ["error measurement"] if hessian and reconstruct is None else []
    if calibration is None and needs:
        raise ValueError(f"{' and '.join(needs)} need calibration batches; pass "
                         "calibration=[batch, ...]")
    batches = None if calibration is None else check_batches(calibration)
    names = [t.name for t in resolved]
    if crit.policy is not None:
        if sparsity is not None or gran.kind != "element":
            raise ValueError(f"criterion {crit!r} selects by threshold: pass sparsity=None "
                             f"(got {sparsity!r}) and granularity 'element' (got {gran})")
        levels: dict[str, float] = {}
    else:
        schedules = resolve_sparsity(names, sparsity, gran, scope, schedules=False)
        levels = {n: float(s(0)) for n, s in schedules.items()}
    return _Plan(model, resolved, levels, crit, batches, gran, scope, reconstruct, request,
                 progress)


def _prune_channels(plan: _Plan, sequential: bool, start: float, strict: bool) -> PruneReport:
    """Whole channel groups, traced on the first calibration batch: the units' biases,
    norms and readers are masked with them, and model outputs are never pruned; targets
    whose channels stay are listed in the report's ``kept``."""
    if plan.reconstruct is not None or sequential:
        raise ValueError("granularity 'channel' removes whole units, scored once: pass "
                         "reconstruct=False and sequential=False (or prune elements or N:M)")
    if plan.batches is None:
        raise ValueError("granularity 'channel' traces the model on the first calibration "
                         "batch to find channel groups; pass calibration=[batch, ...]")
    batches = list(plan.batches)  # traced once, then read by every pass
    example = to_device(batches[0], model_device(plan.model))
    report = PruneReport()
    observed = observe(plan.model, batches, plan.targets, plan.request, progress=plan.progress)
    report.passes = observed.passes
    if plan.criterion.request is not None:
        plan.criterion.fit(plan.targets, observed)
    before = {t.name: t.param.detach().clone() for t in plan.targets} if plan.hessian else {}
    with Pruner(plan.model, plan.sparsity, plan.criterion, scope=plan.scope,
                granularity="channel", targets=[t.name for t in plan.targets],
                example_inputs=example, strict=strict) as pruner:
        pruner.update()
    report.kept = pruner.kept_targets
    for t in plan.targets:
        mask = pruner.masks[t.name]
        error = None
        if plan.hessian:
            assert observed.inputs is not None
            error = relative_error(t.rows(before[t.name]), t.rows(t.param.detach()),
                                   observed.inputs[t.name].hessian())
        report.masks[t.name] = mask
        report.targets.append(TargetReport(t.name, tuple(mask.shape),
                                           1.0 - int(mask.sum()) / mask.numel(), error, ""))
    report.calibration_seconds = report.seconds = time.perf_counter() - start
    return report


def _replayable(batches: Iterable[Batch] | None, passes: int) -> Iterable[Batch] | None:
    """A one-pass iterator is kept in a list when it must be read more than once."""
    if isinstance(batches, Iterator) and passes > 1:
        return list(batches)
    return batches


def _stages(plan: _Plan, key: StageFn) -> dict[str, list[Target]]:
    """Targets grouped by ``key`` and ordered by when the model first calls them."""
    plan.batches = _replayable(plan.batches, 2)
    assert plan.batches is not None
    order = call_order(plan.model, plan.targets, plan.batches)
    rank = {name: i for i, name in enumerate(order)}
    groups: dict[str, list[Target]] = {}
    for t in sorted(plan.targets, key=lambda t: rank.get(t.name, len(rank))):
        groups.setdefault(key(t.module_name), []).append(t)
    return groups


def _prune_stage(plan: _Plan, stage: str, group: list[Target], later: list[Target],
                 report: PruneReport) -> dict[str, torch.Tensor]:
    """Masks and new weights for one stage (nothing is written); fills ``report``."""
    tic = time.perf_counter()
    stats = _statistics(plan, group, later, report)
    scores = {t.name: plan.criterion.score(t) for t in group}
    policy = plan.criterion.policy
    if policy is not None:  # by threshold, from dense: what scores below it goes
        masks = policy.select(scores, {n: torch.ones_like(s, dtype=torch.bool)
                                       for n, s in scores.items()}, 0)
    else:
        masks = select_targets(group, scores, {t.name: plan.sparsity[t.name] for t in group},
                               plan.granularity, plan.scope)
    report.calibration_seconds += time.perf_counter() - tic
    tic = time.perf_counter()
    new: dict[str, torch.Tensor] = {}
    for t in group:
        w, mask = t.param.detach(), masks[t.name]
        hessian = None if stats is None or not plan.hessian else stats[t.name].hessian()
        error: float | None = None
        if plan.reconstruct is not None:
            assert hessian is not None
            # Reconstruction sees the weight as (out, in) rows, as the inputs are collected.
            rw = t.rows(w)
            rec = plan.reconstruct(rw, t.rows(mask), hessian)
            mask = t.rows(t.rows(mask) & ~rec.dead.reshape(1, *rw.shape[1:]).to(mask.device))
            new[t.name], error = t.rows(rec.weight), rec.relative_error
        else:
            new[t.name] = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
            if hessian is not None:
                error = relative_error(t.rows(w), t.rows(new[t.name]), hessian)
        if not bool(torch.isfinite(new[t.name]).all()):
            raise ValueError(f"pruning target {t.name!r} produced NaN or Inf weights "
                             "(nothing was changed)")
        report.masks[t.name] = mask
        report.targets.append(TargetReport(t.name, tuple(w.shape),
                                           1.0 - int(mask.sum()) / mask.numel(), error, stage))
    if plan.reconstruct is not None:
        report.reconstruction_seconds += time.perf_counter() - tic
    return new


def _statistics(plan: _Plan, group: list[Target], later: list[Target],
                report: PruneReport) -> dict[str, InputStats] | None:
    """The calibration pass of one stage, and the criterion's own pass if it has one."""
    batches = plan.batches if plan.batches is not None else []
    observed = observe(plan.model, batches, group, plan.request, progress=plan.progress,
                       stop_before=later)
    report.passes += observed.passes
    if plan.criterion.request is not None:
        plan.criterion.fit(group, observed)
    return observed.inputs


@torch.no_grad()
def _write(targets: list[Target], weights: Mapping[str, torch.Tensor]) -> None:
    for t in targets:
        t.param.copy_(weights[t.name])
