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
from collections.abc import Callable, Iterable
from typing import Any

import torch
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
from ..targets import Target
from .base import Criterion, register_criterion


class _Average:
    """Per-target running values: an EMA over every ``every``-th observation."""

    def __init__(self, decay: float, every: int) -> None:
        self.decay = check.number("decay", decay, low=0.0, high=1.0, high_open=True)
        self.every = check.integer("every", every, low=1)
        self.values: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}

    def due(self, name: str) -> bool:
        """Count one call for ``name``; ``True`` on every ``every``-th (the first included)."""
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        return n % self.every == 0

    def observe(self, name: str, value: torch.Tensor) -> None:
        old = self.values.get(name)
        if old is None:
            self.values[name] = value.clone()
        else:
            old.mul_(self.decay).add_(value, alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"values": {k: v.clone() for k, v in self.values.items()},
                "calls": dict(self.calls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = {k: v.clone() for k, v in state["values"].items()}
        self.calls = {k: int(v) for k, v in state["calls"].items()}


class DataCriterion(Criterion):
    """A criterion whose scores depend on data: calibrated once, or averaged while training.

    Args:
        decay: EMA decay of the statistics refreshed from training batches, in ``[0, 1)``.
        every: Under a Pruner, observe every ``every``-th training forward/backward only.
    """

    def __init__(self, decay: float = 0.9, every: int = 1) -> None:
        self._avg = _Average(decay, every)
        self._handles: list[RemovableHandle] = []

    @property
    @abc.abstractmethod
    def request(self) -> Request:
        """The statistics a calibration pass must collect for this criterion."""

    @abc.abstractmethod
    def fit(self, targets: list[Target], observed: Observed) -> None:
        """Set the statistics of ``targets`` from a pass that collected :attr:`request`."""

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

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _statistic(self, target: Target) -> torch.Tensor:
        value = self._avg.values.get(target.name)
        if value is None:
            raise ValueError(
                f"criterion {self.name!r} has no statistics for target {target.name!r}: "
                "calibrate it first (prune_ does), or, under a Pruner, run a training-mode "
                "forward and backward pass before the first mask update"
            )
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"options": self._options(), **self._avg.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["options"] != self._options():
            raise ValueError(f"criterion state was saved with options {state['options']}, "
                             f"this criterion has {self._options()}")
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
    """

    def __init__(self, p: float = 2.0, *, decay: float = 0.9, every: int = 1) -> None:
        super().__init__(decay, every)
        self.p = check_power(p)

    @property
    def request(self) -> Request:
        """Input statistics ``sum |x|^p``."""
        return Request(powers=(self.p,))

    def fit(self, targets: list[Target], observed: Observed) -> None:
        assert observed.inputs is not None
        for t in targets:
            self._avg.values[t.name] = observed.inputs[t.name].mean_power(self.p)

    def bind(self, model: nn.Module, targets: list[Target]) -> None:
        self.close()
        for t in targets:
            fmap = feature_map(t.name, t.module)
            self._handles.append(t.module.register_forward_pre_hook(
                self._hook(t.name, fmap), with_kwargs=True))

    def _hook(self, name: str, fmap: Any) -> Callable[..., None]:
        p = self.p

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not module.training or not self._avg.due(name):
                return
            x = input_tensor(args, kwargs)
            sums, n = fmap.power_sums(module, x, (p,))
            self._avg.observe(name, sums[p] / n)
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

    The saliency kept under a Pruner is a float32 tensor shaped like each target.
    """

    def __init__(self, loss: LossFn | None = None, *, decay: float = 0.9, every: int = 1) -> None:
        super().__init__(decay, every)
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

    def bind(self, model: nn.Module, targets: list[Target]) -> None:
        self.close()
        for t in targets:
            self._handles.append(t.param.register_post_accumulate_grad_hook(
                self._hook(t.name, t.module)))

    def _hook(self, name: str, module: nn.Module) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is None or not module.training or not self._avg.due(name):
                return
            self._avg.observe(name, (param.detach() * param.grad).abs().float())
        return hook

    def score(self, target: Target) -> torch.Tensor:
        return self._statistic(target).to(target.param.device, target.param.dtype)

    def __repr__(self) -> str:
        return f"Taylor(loss={getattr(self.loss, '__name__', self.loss)!r})"
