"""How :func:`~secateurs.prune_` runs: calibration passes, then per group of targets scores,
masks and (optionally) reconstruction, written in place.

Three ways to run the passes (:data:`~.report.MODES`):

- ``one pass``: every target observed in one pass over the batches;
- ``blocks``: the layer-wise pipeline (:class:`~secateurs.calibration.BlockPipeline`):
  the stem runs once, then each repeated block alone, first on its recorded inputs to
  collect its statistics, then, pruned, to produce the next block's inputs. Calibration
  cost is about two forward passes of the model, whatever its depth;
- ``stages``: whole-model passes, one per stage, each ending where the next stage begins
  (cost quadratic in depth). Used with custom ``stages``, with criteria that need
  gradients of the whole model, and with models the pipeline cannot replay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..calibration import (
    Batch,
    BlockPipeline,
    BlockPlan,
    InputStats,
    Observed,
    Request,
    call_order,
    observe,
    plan_blocks,
)
from ..criteria import Criterion
from ..reconstruction import Reconstruction, relative_error
from ..selection import Granularity, select_targets
from ..targets import Target
from .report import PruneReport, TargetReport

StageFn = Callable[[str], str]


@dataclass
class Plan:
    """Everything :func:`~secateurs.prune_` validated before touching the model."""

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

    @property
    def needs_data(self) -> bool:
        """Whether masks or weights depend on the calibration data."""
        return self.criterion.request is not None or self.reconstruct is not None


@dataclass
class Run:
    """One call's progress: the report so far, and what is needed to undo its writes."""

    plan: Plan
    report: PruneReport = field(default_factory=PruneReport)
    # Target name -> (mask, original values of its pruned entries) when only the mask
    # changed the weight, else (None, the original weight): the undo costs the pruned
    # fraction of the weights without reconstruction, a copy with it; kept in host memory,
    # so an accelerator holds only the weights and one block's working set.
    saved: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)

    @torch.no_grad()
    def write(self, target: Target, mask: torch.Tensor, new: torch.Tensor | None) -> None:
        """Zero ``target`` where ``mask`` is False (``new=None``), or set it to ``new``."""
        w = target.param.detach()
        if new is None:
            keep = mask.to(w.device)
            self.saved[target.name] = (keep, _host(w[~keep]))
            w.masked_fill_(~keep, 0)
        else:
            self.saved[target.name] = (None, _host(w))
            w.copy_(new)

    @torch.no_grad()
    def restore(self) -> None:
        for t in self.plan.targets:
            if t.name in self.saved:
                keep, values = self.saved[t.name]
                if keep is None:
                    t.param.copy_(values)
                else:
                    t.param[~keep] = values.to(t.param.device)

    def fit(self, group: list[Target], observed: Observed) -> dict[str, InputStats] | None:
        self.report.passes += observed.passes
        if self.plan.criterion.request is not None:
            self.plan.criterion.fit(group, observed)
        return observed.inputs

    def stage(self, key: str, group: list[Target], later: list[Target]) -> None:
        """Observe ``group`` in whole-model passes (ending before ``later``), prune it."""
        tic = time.perf_counter()
        batches = self.plan.batches if self.plan.batches is not None else []
        observed = observe(self.plan.model, batches, group, self.plan.request,
                           progress=self.plan.progress, stop_before=later)
        stats = self.fit(group, observed)
        self.report.calibration_seconds += time.perf_counter() - tic
        prune_group(self, key, group, stats)


def _host(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` in host memory."""
    return x.detach().to("cpu", copy=True)


def replayable(batches: Iterable[Batch] | None, passes: int) -> Iterable[Batch] | None:
    """A one-pass iterator is kept in a list when it must be read more than once."""
    if isinstance(batches, Iterator) and passes > 1:
        return list(batches)
    return batches


def run_one_pass(run: Run) -> None:
    run.plan.batches = replayable(run.plan.batches, run.plan.request.passes)
    run.stage("", run.plan.targets, [])


def run_sequential(run: Run, stages: StageFn | None, key: StageFn) -> None:
    """Sequential pruning: the layer-wise pipeline where it applies, else whole-model
    stages (``stages`` given, gradients needed, or a model the pipeline cannot replay;
    ``report.notes`` says why)."""
    plan = run.plan
    plan.batches = replayable(plan.batches, 2)
    if not plan.request.passes:  # nothing observed: the order cannot change any mask
        run.stage("", plan.targets, [])
        return
    assert plan.batches is not None
    reason = "custom stages were given" if stages is not None else None
    if reason is None and plan.request.loss is not None:
        reason = f"criterion {plan.criterion.name!r} needs gradients of the whole model"
    layout: BlockPlan | str = reason or plan_blocks(plan.model, plan.targets, plan.batches)
    if isinstance(layout, str):
        run.report.mode = "stages"
        run.report.notes.append("sequential pruning ran whole-model passes, one per stage "
                                f"(cost quadratic in depth): {layout}")
        _run_stages(run, stages or key)
    else:
        run.report.mode = "blocks"
        _run_blocks(run, layout)


def _run_stages(run: Run, key: StageFn) -> None:
    plan = run.plan
    assert plan.batches is not None
    order = call_order(plan.model, plan.targets, plan.batches)
    rank = {name: i for i, name in enumerate(order)}
    groups: dict[str, list[Target]] = {}
    for t in sorted(plan.targets, key=lambda t: rank.get(t.name, len(rank))):
        groups.setdefault(key(t.module_name), []).append(t)
    keys = list(groups)
    for i, k in enumerate(tqdm(keys, desc="prune_", disable=not plan.progress or len(keys) == 1,
                               leave=False)):
        run.stage(k, groups[k], [t for later in keys[i + 1:] for t in groups[later]])


def _run_blocks(run: Run, layout: BlockPlan) -> None:
    """Stem targets in a pass that ends at block 0; then block by block through the
    pipeline; then the targets after the blocks in one whole-model pass."""
    plan = run.plan
    assert plan.batches is not None
    inside = [t for group in layout.groups for t in group]
    if layout.stem:
        run.stage("stem", layout.stem, inside + layout.tail)
    tic = time.perf_counter()
    pipe = BlockPipeline(plan.model, plan.batches, layout, progress=plan.progress)
    pipe.capture()
    run.report.calibration_seconds += time.perf_counter() - tic
    last = max(i for i, group in enumerate(layout.groups) if group)
    names = layout.blocks.names
    bar = tqdm(range(last + 1), desc="prune_", disable=not plan.progress, leave=False)
    for k in bar:
        bar.set_postfix_str(names[k])
        group = layout.groups[k]
        if group:
            tic = time.perf_counter()
            stats = run.fit(group, pipe.observe(k, group, plan.request))
            run.report.calibration_seconds += time.perf_counter() - tic
            prune_group(run, names[k], group, stats)
        if k < last or layout.tail:
            tic = time.perf_counter()
            pipe.advance(k)
            run.report.calibration_seconds += time.perf_counter() - tic
    run.report.block_calls = pipe.block_calls
    pipe.calls.clear()  # the recorded activations: free them before the head's pass
    if layout.tail:
        run.stage("head", layout.tail, [])


def _dead(name: str, stats: InputStats | None, plan: Plan) -> int:
    """Input features zero on every calibration input; refuses a target whose inputs were
    all zero when its masks or weights would come from them."""
    if stats is None:
        return 0
    dead = int((stats.power_sums[1.0] == 0).sum())
    if dead == stats.features and plan.needs_data:
        raise ValueError(
            f"target {name!r} received only zeros on every calibration input ({stats.count} "
            f"vectors of {stats.features} features): its scores"
            f"{' and reconstruction' if plan.reconstruct is not None else ''} cannot come "
            "from this calibration data; use other calibration batches or exclude the target "
            "(nothing was changed)")
    return dead


def prune_group(run: Run, stage: str, group: list[Target],
                stats: Mapping[str, InputStats] | None) -> None:
    """Masks and new weights for one group from its statistics, written target by target
    (``run.restore`` undoes them); fills the report.

    Row and layer scopes select each target on its own, so only one target's scores and
    new weight exist at a time; global scope and threshold policies rank the group at once.
    """
    plan = run.plan
    dead = {t.name: _dead(t.name, None if stats is None else stats[t.name], plan)
            for t in group}
    if plan.criterion.policy is not None or plan.scope == "global":
        masks = _select(run, group)
        for t in group:
            _apply(run, stage, t, masks.pop(t.name), stats, dead[t.name])
    else:
        for t in group:
            _apply(run, stage, t, _select(run, [t])[t.name], stats, dead[t.name])


def _select(run: Run, group: list[Target]) -> dict[str, torch.Tensor]:
    tic = time.perf_counter()
    plan = run.plan
    scores = {t.name: plan.criterion.score(t) for t in group}
    policy = plan.criterion.policy
    if policy is not None:  # by threshold, from dense: what scores below it goes
        masks = policy.select(scores, {n: torch.ones_like(s, dtype=torch.bool)
                                       for n, s in scores.items()}, 0)
    else:
        masks = select_targets(group, scores, {t.name: plan.sparsity[t.name] for t in group},
                               plan.granularity, plan.scope)
    run.report.calibration_seconds += time.perf_counter() - tic
    return masks


def _apply(run: Run, stage: str, t: Target, mask: torch.Tensor,
           stats: Mapping[str, InputStats] | None, dead: int) -> None:
    """Reconstruct (or mask) one target, check and write it, and report it."""
    tic = time.perf_counter()
    plan = run.plan
    w = t.param.detach()
    hessian = None if stats is None or not plan.hessian else stats[t.name].hessian()
    error: float | None = None
    new: torch.Tensor | None = None
    if plan.reconstruct is not None:
        assert hessian is not None
        # Reconstruction sees the weight as (out, in) rows, as the inputs are collected.
        rec = plan.reconstruct(t.rows(w), t.rows(mask), hessian)
        new, error = t.rows(rec.weight), rec.relative_error
        if not bool(torch.isfinite(new).all()):
            raise ValueError(f"pruning target {t.name!r} produced NaN or Inf weights "
                             "(nothing was changed)")
        run.report.reconstruction_seconds += time.perf_counter() - tic
    elif hessian is not None and dead < hessian.shape[0]:
        masked = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
        error = relative_error(t.rows(w), t.rows(masked), hessian)
    run.write(t, mask, new)
    run.report.masks[t.name] = mask
    run.report.targets.append(TargetReport(t.name, tuple(w.shape),
                                           1.0 - int(mask.sum()) / mask.numel(), error, stage,
                                           dead))
