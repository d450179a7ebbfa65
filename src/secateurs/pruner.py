"""The Pruner: a thin orchestrator deciding *when* masks are updated and enforcing them.

It holds no maths of its own: criteria score, :mod:`secateurs.selection` selects,
:class:`~secateurs.masks.MaskSet` enforces.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import validation as check
from .criteria import Criterion, GroupCriterion, get_criterion
from .criteria.group import BNScale
from .graph import ChannelGroup, ChannelPlan, Structure, plan_channels
from .masks import GradientMask, MaskSet, PrunedValues, is_elementwise
from .schedules import Schedule
from .selection import (
    Granularity,
    SparsitySpec,
    check_scope,
    check_shape,
    parse_granularity,
    resolve_sparsity,
    select_targets,
    select_units,
)
from .tables import text_table
from .targets import Target, TargetSpec, resolve_targets, unwrap_compiled

__all__ = ["Pruner", "SparsitySpec", "Summary", "TargetSummary"]


class Pruner:
    """Prunes a model while it trains: call :meth:`step` right after ``optimizer.step()``.

    At step ``t`` (the number of earlier :meth:`step` calls), when ``t % update_every == 0``
    and the target sparsity has changed (or the criterion regrows by design), the masks are
    recomputed: the criterion scores every target, selection keeps the best units at the
    target sparsity. Masked weights and the matching entries of every optimizer state tensor
    are set to zero, so pruned weights stay exactly zero: with the usual optimizers (SGD,
    Adam, AdamW, ...: :data:`secateurs.masks.ELEMENTWISE_OPTIMIZERS`) when the masks change,
    the masked gradients being zeroed before each optimizer step in between; otherwise, or
    without an optimizer, at every step.

    Args:
        model: The model; its ``state_dict`` keys are never changed.
        sparsity: Cumulative target sparsity in ``[0, 1)``: a float, a schedule of the step,
            or a mapping target name -> float or schedule (per-layer sparsities; then
            ``targets`` defaults to the mapping's names). ``None`` only for N:M (its
            ``1 - N/M``) or for a criterion that selects by threshold.
        criterion: A registered name (``magnitude``, ``random``, ``clipping``, ...) or a
            :class:`~secateurs.criteria.Criterion`.
        scope: ``layer`` (rank within each target), ``global`` (one ranking over all
            targets) or ``row`` (within each output row).
        granularity: ``element``, ``N:M`` (e.g. ``"2:4"``) or ``channel``. With ``channel``
            and ``example_inputs``, a unit is a whole channel group (see
            :mod:`secateurs.graph`): a filter or neuron together with its bias,
            its BatchNorm scale and shift and the input columns of the layers that read
            it, or a whole attention head; its masks cover every coupled parameter, so the
            masked model computes what :func:`secateurs.compact_` will make of it. A group
            shared by several targets takes the largest of their sparsities; targets whose
            channels cannot go (model outputs, LayerNorm-normalised widths, couplings that
            cannot be resolved safely, recurrent layers) keep them, with the reasons in
            :attr:`kept_targets` and :meth:`summary`. ``channel`` needs ``example_inputs``.
        update_every: Steps between mask updates.
        optimizer: If given, its per-element state is masked too (not for criteria that
            regrow, whose weights come back through that state).
        targets: See :func:`secateurs.targets.resolve_targets`.
        example_inputs: Inputs the model can be called on (a tensor, a tuple of positional
            arguments or a dict of keyword arguments), traced once to find channel groups;
            only for ``granularity="channel"``.
        strict: With ``granularity="channel"``, refuse targets whose channel coupling
            cannot be resolved safely (a parameter used outside known layers, a recurrent
            layer) instead of keeping their channels at full width.

    Raises:
        ValueError: on any invalid argument, when no target has channels that can go
            (listing every reason), or, when ``strict``, for a target whose channel coupling
            cannot be resolved (naming it and the reason); before anything is changed.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: SparsitySpec = None,
        criterion: str | Criterion = "magnitude",
        *,
        scope: str = "layer",
        granularity: str | Granularity = "element",
        update_every: int = 1,
        optimizer: torch.optim.Optimizer | None = None,
        targets: TargetSpec = None,
        example_inputs: Any = None,
        strict: bool = False,
    ) -> None:
        if isinstance(sparsity, Mapping) and targets is None:
            targets = list(sparsity)
        # A compiled model prunes the module it wraps: the same names, masks and checkpoints
        # as the module itself, and the compiled forward reads the same parameters.
        self.model = model = unwrap_compiled(model)
        self.targets = resolve_targets(model, targets)
        _refuse_sharded(self.targets)
        self.criterion = get_criterion(criterion)
        self.granularity = parse_granularity(granularity)
        if isinstance(self.criterion, BNScale) and self.granularity.kind != "channel":
            # A TypeError too: scoring elements with it always was one.
            raise check.ArgumentTypeError(
                f"criterion 'bn_scale' scores whole channel groups by their BatchNorm "
                f"scales; use granularity='channel' with example_inputs (got granularity "
                f"{self.granularity}), or criterion 'l1' to score elements")
        check_scope(scope, self.granularity)
        self.scope = scope
        self.update_every = check.integer("update_every", update_every, low=1)
        self.strict = check.boolean("strict", strict)
        for t in self.targets:
            check_shape(t.name, t.row_shape, self.granularity)
        self._schedules = self._resolve_sparsity(sparsity)
        self.optimizer = check.optional(check.instance, "optimizer", optimizer,
                                        types=torch.optim.Optimizer,
                                        what="a torch.optim.Optimizer or None")
        if self.granularity.kind == "channel" and example_inputs is None:
            raise ValueError(
                "granularity 'channel' needs example_inputs (inputs the model can be called "
                "on, e.g. one batch): tracing them finds what each channel couples (its bias, "
                "BatchNorm, the layers reading it) and which channels are model outputs, "
                "which are never pruned")
        self.plan: ChannelPlan | None = None
        if example_inputs is not None:
            self.plan = self._plan_channels(example_inputs)
            if isinstance(self.criterion, BNScale):
                for group in self.plan.groups.values():
                    self.criterion.scales(group, model)  # refuses a group without one
        self.masks = MaskSet(self.targets + ([] if self.plan is None else self.plan.coupled))
        self._step = 0
        self._applied: dict[str, float] | None = None
        self._gradient_mask: GradientMask | None = None  # made at the first enforcement
        self._enforced = -1  # the masks' version when weights and state were last zeroed
        # A criterion that regrows by design keeps training its pruned weights behind the mask.
        self._pruned_values = PrunedValues(self.masks, [t.name for t in self.targets]) \
            if self.criterion.regrows else None
        self.criterion.bind(model, self.targets)
        # The first forwards after the first mask update check that step() was called after
        # optimizer.step(); then the hook goes, so the per-step path pays nothing.
        self._armed = False
        self._checks = 3
        self._order_hook: RemovableHandle | None = model.register_forward_pre_hook(
            _order_check(self))

    def _plan_channels(self, example_inputs: Any) -> ChannelPlan:
        """The channel groups the targets produce (see :func:`secateurs.graph.plan_channels`)."""
        if self.granularity.kind != "channel":
            raise ValueError(f"example_inputs finds channel groups and needs granularity "
                             f"'channel', got {self.granularity}")
        if self._schedules is None:
            raise ValueError("channel groups are selected by sparsity, not by threshold")
        return plan_channels(self.model, self.targets, example_inputs, strict=self.strict)

    def close(self) -> None:
        """Detach the criterion's statistics hooks and the order check (masks stay)."""
        self.criterion.close()
        self.close_order_check()
        if self._gradient_mask is not None:
            self._gradient_mask.close()
            self._gradient_mask = None
            self._enforced = -1

    def _check_order(self, module: nn.Module, args: Any) -> None:
        """On the first forwards after the first mask update: masked weights must be zero,
        or ``step()`` ran before ``optimizer.step()`` and the model computes with them."""
        if not self._armed:
            return
        leaked = self._leaked()
        if leaked:
            warnings.warn(
                f"{sum(leaked.values())} masked weights are non-zero in the forward pass "
                f"({', '.join(f'{n}: {k}' for n, k in list(leaked.items())[:3])}): call "
                "pruner.step() right after optimizer.step(), not before it, so that the "
                "pruned weights are zero when the model runs", RuntimeWarning, stacklevel=2)
        self._checks -= 1
        if leaked or self._checks <= 0:  # the order of a loop does not change: stop looking
            self.close_order_check()

    def close_order_check(self) -> None:
        """Stop checking that masked weights are zero in the forward pass."""
        if self._order_hook is not None:
            self._order_hook.remove()
            self._order_hook = None

    def _leaked(self) -> dict[str, int]:
        """Target name -> masked entries whose weight is not zero."""
        out = {}
        for t in self.targets:
            if t.param.shape != self.masks[t.name].shape:
                continue  # compacted: the masks no longer describe this parameter
            n = int(((t.param.detach() != 0) & ~self.masks[t.name]).sum())
            if n:
                out[t.name] = n
        return out

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resolve_sparsity(self, sparsity: SparsitySpec) -> dict[str, Schedule] | None:
        if self.criterion.policy is not None:
            if sparsity is not None:
                raise ValueError(f"criterion {self.criterion!r} selects by threshold; pass "
                                 f"sparsity=None (got {sparsity!r}) or threshold=None")
            if self.granularity.kind != "element":
                raise ValueError("selection by threshold needs granularity 'element', got "
                                 f"{self.granularity}")
            return None
        return resolve_sparsity([t.name for t in self.targets], sparsity, self.granularity,
                                self.scope)

    # -- the per-step path -------------------------------------------------------------

    def step(self) -> bool:
        """Update masks when due, then enforce them. Call right after ``optimizer.step()``.

        Enforcement follows the masks' version (see :meth:`_enforce`): with an element-wise
        optimizer, weights and optimizer state are zeroed when the masks changed (an update,
        :meth:`load_state_dict`, :meth:`adopt_masks_`), the gradients in between. Weights
        written from outside the optimizer between mask changes (``model.load_state_dict``
        of other weights) are zeroed again by ``pruner.adopt_masks_(dict(pruner.masks))``.

        Returns:
            ``True`` when the masks were recomputed at this step (a prune event, e.g. for LR
            rewinding).
        """
        self.masks.follow_()
        if self._pruned_values is not None:
            self._pruned_values.accumulate_()
        updated = self._step % self.update_every == 0 and self._due()
        if updated:
            self.update()
        self._enforce()
        self._step += 1
        return updated

    def _due(self) -> bool:
        return self._schedules is None or self.criterion.regrows or \
            self.target_sparsity() != self._applied

    def target_sparsity(self) -> dict[str, float] | None:
        """Target name -> target sparsity at the current step (``None`` for thresholds)."""
        if self._schedules is None:
            return None
        return {name: float(s(self._step)) for name, s in self._schedules.items()}

    def update(self) -> None:
        """Recompute the masks now, from the current weights, and zero what they prune.

        Raises:
            ValueError: if a target holds NaN or Inf (nothing is changed).
        """
        self.masks.follow_()
        for name in self.masks:
            if not bool(torch.isfinite(self.masks.target(name).param).all()):
                raise ValueError(f"target {name!r} holds NaN or Inf values; masks cannot be "
                                 "ranked on them (nothing was changed)")
        policy = self.criterion.policy
        sparsity = self.target_sparsity()
        if self._pruned_values is not None:
            self._pruned_values.restore_()
        if self.plan is not None and sparsity is not None:
            new = self._select_channels(self.plan, sparsity)
        elif policy is not None or sparsity is None:
            assert policy is not None, "without a sparsity the criterion selects by threshold"
            scores = {t.name: self.criterion.score(t) for t in self.targets}
            new = policy.select(scores, self.masks, self._step)
        else:
            scores = {t.name: self.criterion.score(t) for t in self.targets}
            previous = None if self.criterion.regrows else self.masks
            new = select_targets(self.targets, scores, sparsity, self.granularity, self.scope,
                                 previous)
        if self._pruned_values is not None:
            self._pruned_values.record_()
        for name, mask in new.items():
            self.masks.set_(name, mask)
        self.masks.apply_()
        self._applied = sparsity
        self._armed = True

    def _select_channels(self, plan: ChannelPlan, sparsity: Mapping[str, float]
                         ) -> dict[str, torch.Tensor]:
        """Masks of every coupled parameter: unit scores of each channel group, selected,
        turned into masks by the plan."""
        crit = self.criterion
        if isinstance(crit, GroupCriterion):
            scores = {name: crit.score_group(g, self.model) for name, g in plan.groups.items()}
        else:
            wanted = plan.params
            scores = plan.reduce({t.name: crit.score(t) for t in self.targets
                                  if t.name in wanted})
        previous = None if crit.regrows else \
            {name: ~off for name, off in plan.off(self.masks).items()}
        keeps = select_units(scores, plan.unit_sparsity(sparsity), self.scope, previous)
        return plan.masks(keeps, self.masks)

    # -- reading ---------------------------------------------------------------------------

    @property
    def channel_groups(self) -> list[ChannelGroup]:
        """The channel groups whose units this pruner removes (empty unless granularity is
        ``channel`` with ``example_inputs``)."""
        return [] if self.plan is None else list(self.plan.groups.values())

    @property
    def kept_targets(self) -> dict[str, str]:
        """Target name -> why its output channels stay at full width (empty unless
        granularity is ``channel`` with ``example_inputs``)."""
        return {} if self.plan is None else self.plan.kept_targets

    @property
    def structure(self) -> Structure | None:
        """Every channel group of the model (``None`` unless granularity is ``channel``
        with ``example_inputs``)."""
        return None if self.plan is None else self.plan.structure

    @property
    def applied_sparsity(self) -> dict[str, float] | None:
        """Target name -> the target sparsity the masks were last computed for (``None``
        before the first update, or when selecting by threshold)."""
        return None if self._applied is None else dict(self._applied)

    def caught_up(self) -> bool:
        """Whether the masks were last computed for the current target sparsity (they are
        recomputed only every ``update_every`` steps)."""
        return self._applied == self.target_sparsity()

    @torch.no_grad()
    def adopt_masks_(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        """Continue from masks found elsewhere (default: ``weight != 0`` of each target).

        Masked weights and, unless the criterion regrows, their optimizer state are zeroed
        at once, by the same rule as :meth:`step`. Later updates nest inside these masks, so
        a schedule may start at the adopted sparsity.

        Raises:
            ValueError: for masks that do not name the targets or do not fit their shapes
                (nothing is changed).
        """
        if masks is None:
            masks = {t.name: t.param.detach() != 0 for t in self.targets}
        names = [t.name for t in self.targets]
        unknown = sorted(set(masks) - set(self.masks))
        if unknown:
            raise ValueError(f"masks name {unknown}, which are not targets of the pruner; "
                             f"targets: {names}")
        for name, mask in masks.items():
            shape = tuple(self.masks[name].shape)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool \
                    or tuple(mask.shape) != shape:
                got = (f"{mask.dtype} of shape {tuple(mask.shape)}"
                       if isinstance(mask, torch.Tensor) else type(mask).__name__)
                raise ValueError(f"mask for {name!r} must be torch.bool of shape {shape}, "
                                 f"got {got}")
        for name, mask in masks.items():
            self.masks.set_(name, mask.clone())
        self._enforce()

    def _enforce(self) -> None:
        """Zero masked weights and, unless the criterion regrows, their optimizer state.

        With an optimizer of :data:`~secateurs.masks.ELEMENTWISE_OPTIMIZERS` (and a criterion
        that does not regrow), weights and state are zeroed only when the masks changed
        since they last were, and a :class:`~secateurs.masks.GradientMask` zeroes the masked
        gradients before each optimizer step, which keeps them zero in between; targets the
        optimizer does not update have their weights zeroed at every call. Otherwise
        (no optimizer, another kind of optimizer, a criterion that regrows) weights, and the
        optimizer's state where there is one, are zeroed at every call.
        """
        opt = self.optimizer
        if opt is None or self.criterion.regrows or not is_elementwise(opt):
            self.masks.apply_()
            if opt is not None and not self.criterion.regrows:
                self.masks.apply_to_optimizer_(opt)
            return
        grads = self._gradient_mask
        if grads is None or grads.optimizer is not opt:  # first call, or a new optimizer
            if grads is not None:
                grads.close()
            self._gradient_mask = grads = GradientMask(self.masks, opt)
            self._enforced = -1
        if self.masks.version != self._enforced:
            self.masks.apply_()
            self.masks.apply_to_optimizer_(opt)
            self._enforced = self.masks.version
            return
        sparse = self.masks.sparse_names()
        if sparse:
            covered = grads.covered()
            self.masks.apply_([n for n in sparse if n not in covered])

    @property
    def step_count(self) -> int:
        """How many times :meth:`step` has been called."""
        return self._step

    def sparsity(self, name: str | None = None) -> float:
        """Realised sparsity over all targets, or of ``name``: the fraction of elements that
        are masked *and* zero in the weights, so it says what the model computes with.

        Warns (``RuntimeWarning``) when masked weights are non-zero, which happens when
        :meth:`step` runs before ``optimizer.step()`` instead of after it.
        """
        names = [t.name for t in self.targets] if name is None else [name]
        total = pruned = 0
        leaked = 0
        for n in names:
            mask = self.masks[n]
            zero = self.masks.target(n).param.detach() == 0
            total += mask.numel()
            pruned += int((zero & ~mask).sum())
            leaked += int((~zero & ~mask).sum())
        if leaked:
            warnings.warn(f"{leaked} masked weights are non-zero, so the realised sparsity "
                          "is below the masks': call pruner.step() right after "
                          "optimizer.step()", RuntimeWarning, stacklevel=2)
        return pruned / total if total else 0.0

    def summary(self) -> Summary:
        """Per-target table: shape, parameters, non-zeros, sparsity; with channel groups,
        also the targets kept at full width and why (:attr:`Summary.kept`)."""
        rows = []
        for t in self.targets:
            p = t.param.detach()
            pruned = int(((p == 0) & ~self.masks[t.name]).sum())
            rows.append(TargetSummary(t.name, tuple(p.shape), p.numel(),
                                      int(torch.count_nonzero(p)), pruned / p.numel()))
        return Summary(rows, kept=self.kept_targets)

    # -- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: step, masks, last applied targets, criterion."""
        return {
            "step": self._step,
            "masks": self.masks.state_dict(),
            "applied": None if self._applied is None else dict(self._applied),
            "criterion": self.criterion.state_dict(),
            "pruned_values": None if self._pruned_values is None
            else self._pruned_values.state_dict(),
        }

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` takes ``state``; nothing
        changes. Tensors may be on the ``meta`` device (shapes and dtypes are checked)."""
        keys = {"step", "masks", "applied", "criterion"}
        if not isinstance(state, Mapping) or not keys <= set(state):
            raise ValueError(f"a pruner state is a mapping with keys {sorted(keys)}")
        step = state["step"]
        if type(step) is not int or step < 0:
            raise ValueError(f"state 'step' must be an integer >= 0, got {step!r}")
        _check_like("masks", state["masks"], self.masks)
        values = state.get("pruned_values")
        if self._pruned_values is not None:
            if values is None:
                raise ValueError(f"criterion {self.criterion!r} regrows and needs the "
                                 "state's 'pruned_values'; the state has none")
            _check_like("pruned values", values,
                        {t.name: t.param for t in self.targets})
        applied = state["applied"]
        if applied is not None and not (isinstance(applied, Mapping) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                for v in applied.values())):
            raise ValueError(f"state 'applied' must map target names to sparsities in "
                             f"[0, 1], got {applied!r:.80}")
        check_criterion = getattr(self.criterion, "check_state_dict", None)
        if check_criterion is not None:
            check_criterion(state["criterion"])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`, all or nothing: the state is checked first
        (:meth:`check_state_dict`), and if a part is refused all the same, what was
        already restored is put back.

        Model weights and optimizer state are restored by their own ``load_state_dict``.
        """
        self.check_state_dict(state)
        before = self.state_dict()
        try:
            self._restore(state)
        except BaseException:
            self._restore(before)
            raise

    def _restore(self, state: Mapping[str, Any]) -> None:
        self.criterion.load_state_dict(state["criterion"])
        self.masks.load_state_dict(state["masks"])
        if self._pruned_values is not None:
            self._pruned_values.load_state_dict(state["pruned_values"])
        self._step = state["step"]
        applied = state["applied"]
        self._applied = None if applied is None else dict(applied)


def _check_like(kind: str, state: Any, live: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``state`` maps the names of ``live`` to tensors of their
    shapes and dtypes."""
    if not isinstance(state, Mapping) or set(state) != set(live):
        names = set(state) if isinstance(state, Mapping) else set()
        raise ValueError(f"{kind} names do not match the targets: missing "
                         f"{sorted(set(live) - names)[:8]}, unexpected "
                         f"{sorted(names - set(live))[:8]}")
    for name, v in state.items():
        want = live[name]
        if not isinstance(v, torch.Tensor) or v.shape != want.shape or v.dtype != want.dtype:
            got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) \
                else type(v).__name__
            raise ValueError(f"{kind} for {name!r} must be {want.dtype} of shape "
                             f"{tuple(want.shape)}, got {got}")


def _refuse_sharded(targets: list[Target]) -> None:
    """Refuse ``DTensor`` parameters (FSDP2, tensor parallelism), whose selection would
    fail at the first mask update."""
    # A DTensor exists only once its module is imported: nothing to import (or pay) here.
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    sharded = [t.name for t in targets if dtensor is not None and isinstance(t.param, dtensor)]
    if sharded:
        raise TypeError(
            f"targets {sharded[:4]}{'...' if len(sharded) > 4 else ''} are DTensor shards "
            "(FSDP2 fully_shard, or tensor parallelism), which a Pruner cannot prune: train "
            "with DistributedDataParallel and call secateurs.distributed.step(pruner) after "
            "optimizer.step(), or prune the unsharded model first (secateurs.prune_, or a "
            "Pruner) and shard the pruned model afterwards")


def _order_check(pruner: Pruner) -> Callable[[nn.Module, Any], None]:
    # A plain function holding a weak reference: copying the model (deepcopy copies a bound
    # method's owner) must not copy the pruner, nor keep it alive.
    ref = weakref.ref(pruner)

    def hook(module: nn.Module, args: Any) -> None:
        # Under torch.compile the check would break the graph (it reads tensors into
        # Python numbers): the compiled forward skips it; eager forwards still check.
        if torch.compiler.is_compiling():
            return
        owner = ref()
        if owner is not None:
            owner._check_order(module, args)
    return hook


@dataclass(frozen=True)
class TargetSummary:
    """One row of :meth:`Pruner.summary`."""

    name: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    sparsity: float


class Summary(list[TargetSummary]):
    """Rows of :class:`TargetSummary`; ``str()`` renders a table with a total row, then the
    targets kept at full width, if any, with the reasons.

    Attributes:
        kept: Target name -> why its output channels stay at full width (channel pruning).
    """

    def __init__(self, rows: Iterable[TargetSummary] = (),
                 kept: Mapping[str, str] | None = None) -> None:
        super().__init__(rows)
        self.kept: dict[str, str] = dict(kept or {})

    def __str__(self) -> str:
        params = sum(r.params for r in self)
        nonzero = sum(r.nonzero for r in self)
        masked = sum(r.sparsity * r.params for r in self)
        total = TargetSummary("total", (), params, nonzero, masked / params if params else 0.0)
        cells = [[r.name, "x".join(map(str, r.shape)), f"{r.params:,}", f"{r.nonzero:,}",
                  f"{r.sparsity:.1%}"] for r in [*self, total]]
        table = text_table(["target", "shape", "params", "non-zero", "sparsity"], cells[:-1],
                           left=2, footer=cells[-1:])
        return table if not self.kept else f"{table}\n\n{kept_table(self.kept)}"


def kept_table(kept: Mapping[str, str]) -> str:
    """Table of targets kept at full width, one row per target, each pointing to its reason
    in the numbered list below (many targets share one reason)."""
    reasons = list(dict.fromkeys(kept.values()))
    number = {r: f"[{i}]" for i, r in enumerate(reasons, 1)}
    table = text_table(["output channels kept", "why"],
                       [[n, number[r]] for n, r in kept.items()], left=1)
    return "\n".join([table, *(f"{number[r]} {r}" for r in reasons)])
