"""Criteria that look at the data the model sees: input contribution and first-order Taylor.

Each takes its statistics from one of two places:

- a calibration pass: the criterion declares its :attr:`~DataCriterion.request`, the
  calibration layer (:func:`secateurs.calibration.observe`) runs the passes and
  :meth:`~DataCriterion.fit` takes the result (:func:`secateurs.prune_` does this;
  :meth:`DataCriterion.calibrate` does it for one call),
- the training batches themselves, when bound to a :class:`~secateurs.Pruner`: hooks keep an
  exponential moving average (EMA) ``m <- decay * m + (1 - decay) * batch`` (the first
  observation initialises it), so masks follow the data the model is trained on. The
  averages are part of ``state_dict``, so a resumed run is exact.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import validation as check
from ..calibration import (
    Batch,
    InputStats,
    LossFn,
    Observed,
    Request,
    check_power,
    feature_map,
    input_tensor,
    observe,
)
from ..calibration.stats import finite_power_sums
from ..targets import Target
from .base import Criterion, register_criterion


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _inside_ddp() -> bool:
    """Whether this runs inside a ``DistributedDataParallel`` forward (DDP marks it for
    TorchDynamo); ``False`` if a version of torch stops saying so (then a warning, not a
    silent divergence, is what follows)."""
    ddp = nn.parallel.DistributedDataParallel
    return getattr(ddp, "_active_ddp_module", None) is not None


def _is_finite(t: torch.Tensor) -> bool:
    return t.is_meta or bool(torch.isfinite(t).all())


class _Average:
    """Per-target running values: an EMA over every ``every``-th finite observation.

    Attributes:
        values: Target name -> its running value.
        calls: Target name -> observations offered (skipped ones included).
        skipped: Target name -> observations refused because they held NaN or Inf.
        synced: Whether ``values`` are the same on every rank (no observation since the
            last average across ranks).
    """

    def __init__(self, decay: float, every: int) -> None:
        self.decay = check.number("decay", decay, low=0.0, high=1.0, high_open=True)
        self.every = check.integer("every", every, low=1)
        self.values: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.synced = True

    def due(self, name: str) -> bool:
        """Count one call for ``name``; ``True`` on every ``every``-th (the first included)."""
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        return n % self.every == 0

    def observe(self, name: str, value: torch.Tensor | None) -> bool:
        """Fold ``value`` into the average; ``False`` (and counted) when it is ``None`` or
        not finite: one poisoned batch must not make the average NaN or Inf for good."""
        if value is None or not _is_finite(value):
            self.skipped[name] = self.skipped.get(name, 0) + 1
            return False
        old = self.values.get(name)
        if old is None:
            self.values[name] = value.clone()
        else:
            old.mul_(self.decay).add_(value, alpha=1.0 - self.decay)
        self.synced = False
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"values": {k: v.clone() for k, v in self.values.items()},
                "calls": dict(self.calls), "skipped": dict(self.skipped),
                "synced": self.synced}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = {k: v.clone() for k, v in state["values"].items()}
        self.calls = {k: int(v) for k, v in state["calls"].items()}
        self.skipped = {k: int(v) for k, v in (state.get("skipped") or {}).items()}
        # A state from before ranks were told apart may differ between ranks.
        self.synced = bool(state.get("synced", False))


def _counts(what: str, value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items()):
        raise ValueError(f"criterion state {what!r} must map target names to counts >= 0, "
                         f"got {value!r:.80}")
    return value


class DataCriterion(Criterion):
    """A criterion whose scores depend on data: calibrated once, or averaged while training.

    Under ``DistributedDataParallel`` each rank's hooks see only its own batches; before
    scores are computed from statistics that changed since they were last averaged, every
    floating-point statistic is averaged across ranks (one all-reduce, when the pruner
    updates its masks: every rank does, at the same step), so a plain ``pruner.step()``
    gives every rank the same masks. For ``contribution`` over equally sized shards the
    average is exactly the statistic of the global batch.
    :func:`secateurs.distributed.step` does the same, and also checks that the masks
    agree. The average is taken only for statistics observed inside a DDP forward, so a
    pruner that runs on one rank alone never waits for the others; for statistics that
    differ between the ranks of a process group without DDP (another data-parallel
    engine) a ``RuntimeWarning`` says to call :func:`secateurs.distributed.step`.

    Observations holding NaN or Inf (one overflowing fp16 batch) are skipped and counted
    (:attr:`skipped`), with one ``RuntimeWarning``; statistics that are not finite (from
    a calibration pass, or a state) are refused when scoring and when loading.

    Args:
        decay: EMA decay of the statistics refreshed from training batches, in ``[0, 1)``.
        every: Under a Pruner, observe every ``every``-th training forward/backward only.
        sync: Under ``torch.distributed``, average the statistics across ranks before
            scoring (``False`` keeps each rank's own, e.g. to broadcast rank 0's masks).
    """

    def __init__(self, decay: float = 0.9, every: int = 1, *, sync: bool = True) -> None:
        self._avg = _Average(decay, every)
        self.sync = check.boolean("sync", sync)
        self._handles: list[RemovableHandle] = []
        self._shapes: dict[str, tuple[int, ...] | None] = {}  # bound target -> statistic
        self._warned = False
        self._under_ddp = False  # the last observation ran inside a DDP forward
        self._warned_ranks = False

    @property
    @abc.abstractmethod
    def request(self) -> Request:
        """The statistics a calibration pass must collect for this criterion."""

    @abc.abstractmethod
    def fit(self, targets: list[Target], observed: Observed) -> None:
        """Set the statistics of ``targets`` from a pass that collected :attr:`request`."""

    def _shape(self, target: Target) -> tuple[int, ...] | None:
        """The shape of the statistic kept for ``target`` (``None``: not checked)."""
        return None

    @property
    def skipped(self) -> dict[str, int]:
        """Target name -> training observations skipped because they held NaN or Inf."""
        return dict(self._avg.skipped)

    def calibrate(self, model: nn.Module, targets: list[Target], batches: Iterable[Batch], *,
                  stats: dict[str, InputStats] | None = None, progress: bool = True) -> None:
        """Run the passes :attr:`request` asks for over ``batches`` and :meth:`fit` them.

        Args:
            model: The model.
            targets: The targets to score.
            batches: Calibration batches.
            stats: Input statistics already collected (with at least the powers of
                :attr:`request`): no statistics pass runs.
            progress: Show progress bars.
        """
        request = self.request
        if stats is not None:
            observed = observe(model, batches, targets, Request(loss=request.loss),
                               progress=progress)
            observed.inputs = stats
        else:
            observed = observe(model, batches, targets, request, progress=progress)
        self.fit(targets, observed)

    def _bind_model(self, model: nn.Module, targets: list[Target]) -> None:
        """Remember the targets' statistic shapes, and watch whether the model's training
        forwards run under DDP."""
        self._shapes = {t.name: self._shape(t) for t in targets}

        def watch(module: nn.Module, args: Any) -> None:
            if module.training:
                self._under_ddp = _inside_ddp()
        self._handles.append(model.register_forward_pre_hook(watch))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _observe(self, name: str, value: torch.Tensor | None) -> None:
        if self._avg.observe(name, value) or self._warned:
            return
        self._warned = True
        warnings.warn(
            f"criterion {self.name!r} skipped a training batch whose statistics for target "
            f"{name!r} are not finite (NaN or Inf in its input or gradient, as an fp16 "
            "overflow gives); its statistics keep their earlier values. Later skips are "
            "counted in criterion.skipped without a warning", RuntimeWarning, stacklevel=3)

    def _share(self) -> None:
        """Average statistics that may differ between ranks; or say they were not."""
        if self._under_ddp:
            self.all_reduce_()
        elif not self._warned_ranks:
            self._warned_ranks = True
            warnings.warn(
                f"criterion {self.name!r} scores from statistics of this rank's batches only "
                f"(rank {dist.get_rank()} of {_world()}; the model does not run under "
                "DistributedDataParallel, so they are not averaged across ranks): if the "
                "ranks train on different data their masks differ. Call "
                "secateurs.distributed.step(pruner) in place of pruner.step(), or pass "
                "sync=False to the criterion if this pruner runs on one rank alone",
                RuntimeWarning, stacklevel=4)

    def all_reduce_(self) -> None:
        """Average the statistics across ranks, in place; a collective (call on every rank,
        each holding statistics for the same targets). Outside a process group it only
        marks them as shared."""
        world = _world()
        if world > 1 and self._avg.values:
            device = torch.device("cuda", torch.cuda.current_device()) \
                if dist.get_backend() == "nccl" else torch.device("cpu")
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for name in sorted(self._avg.values):
                t = self._avg.values[name]
                by_dtype.setdefault(t.dtype, []).append(t)
            for group in by_dtype.values():
                flat = torch.cat([t.reshape(-1).to(device) for t in group])
                dist.all_reduce(flat)
                flat.div_(world)
                for t, part in zip(group, flat.split([t.numel() for t in group]),
                                   strict=True):
                    t.copy_(part.view_as(t))
        self._avg.synced = True

    def _statistic(self, target: Target) -> torch.Tensor:
        if self.sync and not self._avg.synced and _world() > 1:
            self._share()
        value = self._avg.values.get(target.name)
        if value is None:
            raise ValueError(
                f"criterion {self.name!r} has no statistics for target {target.name!r}: "
                "calibrate it first (prune_ does), or, under a Pruner, run a training-mode "
                "forward and backward pass before the first mask update"
            )
        if not _is_finite(value):
            raise ValueError(f"criterion {self.name!r} holds NaN or Inf statistics for "
                             f"target {target.name!r} (from calibration data holding them, "
                             "or an overflow); masks cannot be ranked on them")
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"options": self._options(), **self._avg.state_dict()}

    def check_state_dict(self, state: Any) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` takes ``state``: the same
        options, statistics shaped as this criterion keeps them for the targets it is
        bound to, all finite (tensors on the ``meta`` device are checked for shape only),
        and counts >= 0. Nothing changes."""
        if not isinstance(state, dict) or not isinstance(state.get("values"), dict):
            raise ValueError(f"criterion {self.name!r} state must be a mapping with "
                             f"'options', 'values' and 'calls', got {type(state).__name__}")
        if state.get("options") != self._options():
            raise ValueError(f"criterion state was saved with options {state.get('options')}, "
                             f"this criterion has {self._options()}")
        _counts("calls", state.get("calls"))
        _counts("skipped", state.get("skipped") or {})
        for name, v in state["values"].items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise ValueError(f"criterion statistics for {name!r} must be a floating-point "
                                 f"tensor, got {v!r:.60}")
            if self._shapes and name not in self._shapes:
                raise ValueError(f"criterion statistics for {name!r}, which is not a target; "
                                 f"targets: {sorted(self._shapes)[:8]}")
            want = self._shapes.get(name)
            if want is not None and tuple(v.shape) != want:
                raise ValueError(f"criterion statistics for {name!r} have shape "
                                 f"{tuple(v.shape)}; this target's have {want}")
            if not _is_finite(v):
                raise ValueError(f"criterion statistics for {name!r} hold NaN or Inf")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, after :meth:`check_state_dict` (all or nothing)."""
        self.check_state_dict(state)
        self._avg.load_state_dict(state)

    def _options(self) -> dict[str, Any]:
        return {"decay": self._avg.decay, "every": self._avg.every}


@register_criterion("contribution")
class Contribution(DataCriterion):
    """Input contribution: ``score_ij = |w_ij| * ||x_j||_p`` over the inputs ``x`` the layer sees.

    ``p = 1`` gives ``sum_n |w_ij x_nj|``, each weight's summed absolute contribution to its
    output; ``p = 2`` is Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach
    for Large Language Models"). The norm is taken per input vector,
    ``(mean_n |x_nj|^p)^(1/p) = ||x_j||_p / N^(1/p)``, which ranks identically within a
    layer and keeps layers with different numbers of inputs (convolutions) comparable in a
    global ranking. For a convolution, ``j`` runs over the unfolded patch
    (``in_channels * kh * kw``, as ``weight.flatten(1)``).

    Args:
        p: The norm, a finite number ``>= 1``. The default, 2, kept slightly more fidelity
            than ``p = 1`` at 30-60% unstructured sparsity on a pretrained sentence encoder,
            on every split tried; ``p = 1`` did slightly better at 2:4
            (``benchmarks/adaptive.py``).
        decay: EMA decay of the per-feature statistics under a Pruner.
        every: Under a Pruner, refresh the statistics on every ``every``-th training forward.
        sync: See :class:`DataCriterion`.

    Under a Pruner the per-feature statistics are float64, from sums that cannot overflow
    (inputs whose powers overflow float32 are rescaled by a power of two first).
    """

    def __init__(self, p: float = 2.0, *, decay: float = 0.9, every: int = 1,
                 sync: bool = True) -> None:
        super().__init__(decay, every, sync=sync)
        self.p = check_power(p)

    @property
    def request(self) -> Request:
        """Input statistics ``sum |x|^p``."""
        return Request(powers=(self.p,))

    def fit(self, targets: list[Target], observed: Observed) -> None:
        assert observed.inputs is not None
        for t in targets:
            self._avg.values[t.name] = observed.inputs[t.name].mean_power(self.p)

    def _shape(self, target: Target) -> tuple[int, ...]:
        return (target.row_shape[1:].numel(),)

    def bind(self, model: nn.Module, targets: list[Target]) -> None:
        self.close()
        self._bind_model(model, targets)
        for t in targets:
            fmap = feature_map(t.name, t.module)
            self._handles.append(t.module.register_forward_pre_hook(
                self._hook(t.name, fmap), with_kwargs=True))

    def _hook(self, name: str, fmap: Any) -> Callable[..., None]:
        p = self.p

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not module.training or not self._avg.due(name):
                return
            got = finite_power_sums(fmap, module, input_tensor(args, kwargs), (p,))
            self._observe(name, None if got is None else got[0][p] / got[1])
        return hook

    def score(self, target: Target) -> torch.Tensor:
        w = target.rows(target.param.detach())
        norm = self._statistic(target).pow(1.0 / self.p).to(w.device, w.dtype)
        return target.rows(w.abs() * norm.reshape(1, *w.shape[1:]))

    def _options(self) -> dict[str, Any]:
        return {"p": self.p, **super()._options()}

    def __repr__(self) -> str:
        return f"Contribution(p={self.p:g})"


@register_criterion("taylor")
class Taylor(DataCriterion):
    """First-order Taylor saliency: ``score = |w * dL/dw|``, accumulated over batches.

    The loss change from removing a weight is ``~ -w * dL/dw`` to first order (Molchanov et
    al. 2017, "Pruning Convolutional Neural Networks for Resource Efficient Inference");
    its magnitude is averaged over batches, ``(1/B) sum_b |w * dL_b/dw|``.

    Args:
        loss: ``loss(model, batch) -> scalar tensor``, for calibration passes. Not needed
            under a Pruner, where the training gradients are read after each backward.
        decay: EMA decay of the saliency under a Pruner.
        every: Under a Pruner, observe every ``every``-th backward pass.
        sync: See :class:`DataCriterion`.

    The saliency kept under a Pruner is a float32 tensor shaped like each target, computed
    in float32 from half-precision weights and gradients.
    """

    def __init__(self, loss: LossFn | None = None, *, decay: float = 0.9, every: int = 1,
                 sync: bool = True) -> None:
        super().__init__(decay, every, sync=sync)
        self.loss = check.optional(check.callable_, "loss", loss,
                                   what="a callable (model, batch) -> scalar tensor")

    @property
    def request(self) -> Request:
        """Gradient sums under :attr:`loss`.

        Raises:
            ValueError: without a loss (a calibration pass needs one).
        """
        if self.loss is None:
            raise ValueError("criterion 'taylor' needs a loss for a calibration pass: pass "
                             "Taylor(loss=lambda model, batch: ...)")
        return Request(loss=self.loss)

    def fit(self, targets: list[Target], observed: Observed) -> None:
        assert observed.gradients is not None
        n = max(observed.batches, 1)
        for t in targets:
            self._avg.values[t.name] = (t.param.detach().abs().float()
                                        * observed.gradients[t.name] / n)

    def _shape(self, target: Target) -> tuple[int, ...]:
        return tuple(target.param.shape)

    def bind(self, model: nn.Module, targets: list[Target]) -> None:
        self.close()
        self._bind_model(model, targets)
        for t in targets:
            self._handles.append(t.param.register_post_accumulate_grad_hook(
                self._hook(t.name, t.module)))

    def _hook(self, name: str, module: nn.Module) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is None or not module.training or not self._avg.due(name):
                return
            self._observe(name, (param.detach().float() * param.grad.float()).abs())
        return hook

    def score(self, target: Target) -> torch.Tensor:
        return self._statistic(target).to(target.param.device, target.param.dtype)

    def __repr__(self) -> str:
        return f"Taylor(loss={getattr(self.loss, '__name__', self.loss)!r})"
