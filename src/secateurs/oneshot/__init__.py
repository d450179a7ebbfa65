"""One-shot pruning with calibration data: :func:`prune_`.

Calibration collects input statistics, a criterion scores, :func:`secateurs.selection.select`
chooses the masks, and, optionally, :mod:`secateurs.reconstruction` updates the kept
weights. In sequential mode each repeated block (``encoder.layer.3``, ``model.layers.3``)
is pruned on the outputs of the blocks already pruned, through the layer-wise pipeline of
SparseGPT and Wanda (:class:`~secateurs.calibration.BlockPipeline`: cost linear in depth);
see :mod:`.stages`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .. import validation as check
from ..calibration import Batch, Request, check_batches, model_device, observe, to_device
from ..criteria import Criterion, get_criterion
from ..pruner import Pruner
from ..reconstruction import Reconstruction, relative_error
from ..selection import (
    Granularity,
    check_scope,
    check_shape,
    parse_granularity,
    resolve_sparsity,
)
from ..targets import TargetSpec, resolve_targets
from .report import MODES, PruneReport, TargetReport
from .stages import Plan, Run, StageFn, run_one_pass, run_sequential

__all__ = ["MODES", "PruneReport", "StageFn", "TargetReport", "block_of", "prune_"]


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
        sequential: Prune block by block, each repeated block (``encoder.layer.N``,
            ``model.layers.N``, ...) calibrated on the outputs of the blocks already pruned,
            through the layer-wise pipeline (:class:`~secateurs.calibration.BlockPipeline`):
            the stem runs once per batch, then each block alone, twice per batch (its
            statistics, then its pruned outputs); targets before and after the blocks are
            pruned first and last. Calibration costs about two forward passes whatever the
            depth. Peak memory: the weights, one block's inputs for every calibration batch
            (``tokens x hidden`` values, replaced batch by batch by its outputs), one
            block's activations on one batch, and the statistics of one block's targets
            (``F x F`` float64 each with reconstruction or ``measure_error``), where one
            pass holds every target's at once. Where the pipeline cannot replay the model
            (``report.notes`` says why), with ``stages`` and with gradient criteria,
            whole-model passes run instead, one per stage, each ending where the next begins
            (cost quadratic in depth; ``report.mode`` is ``"stages"``). Off by default: on
            MiniLM and on 8- and 32-layer Llama-style models it gave the fidelity of one
            pass (median difference 0.000 mean cosine, within +-0.011) in about the same
            time with reconstruction, up to twice the CPU time without, and about half the
            added memory with reconstruction (``benchmarks/oneshot_llm.py``); recipes and
            ``secateurs prune`` turn it on, for that memory bound.
        stages: Module name -> stage key; targets sharing a key form one stage, run with
            whole-model passes (see ``sequential``) in the order the model first calls them
            (:func:`block_of` gives the blocks).
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
    run = Run(plan)
    try:
        if sequential:
            run_sequential(run, stages, block_of)
        else:
            run_one_pass(run)
    except BaseException:
        run.restore()
        raise
    report = run.report
    dead = report.dead_note()
    if dead:
        report.notes.append(dead)
    rank = {t.name: i for i, t in enumerate(plan.targets)}
    report.targets.sort(key=lambda r: rank[r.name])
    report.masks = {r.name: report.masks[r.name] for r in report.targets}
    report.seconds = time.perf_counter() - start
    return report


def _plan(model: nn.Module, sparsity: float | Mapping[str, float] | None,
          criterion: str | Criterion, calibration: Iterable[Batch] | None,
          granularity: str | Granularity, scope: str, targets: TargetSpec,
          reconstruct: Reconstruction | None, hessian: bool, progress: bool) -> Plan:
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
    return Plan(model, resolved, levels, crit, batches, gran, scope, reconstruct, request,
                 progress)


def _prune_channels(plan: Plan, sequential: bool, start: float, strict: bool) -> PruneReport:
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


