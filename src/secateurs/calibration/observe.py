"""What a calibration pass collects, asked for once: a :class:`Request`, run by
:func:`observe`, answered by :class:`Observed`.

A data-driven criterion declares its :class:`Request` (``Contribution`` asks for input
statistics ``sum |x|^p``, ``Taylor`` for gradient sums under a loss); the one-shot pipeline
merges it with what reconstruction needs (``X^T X``), runs the passes here, and hands the
result to the criterion's ``fit``. The criterion never runs a pass itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..targets import Target
from .collect import Batch, LossFn, calibrate, gradient_sums
from .stats import InputStats

__all__ = ["Observed", "Request", "observe"]


@dataclass(frozen=True)
class Request:
    """The statistics a calibration pass must collect.

    Attributes:
        powers: Powers ``p`` of the per-feature input sums ``sum_n |x_nj|^p``; a statistics
            pass runs when this is non-empty or ``hessian`` is set.
        hessian: Also ``X^T X`` per target (for reconstruction and error measurement).
        loss: ``loss(model, batch) -> scalar``: a second pass sums ``|dL_b/dw|`` per weight.
    """

    powers: tuple[float, ...] = ()
    hessian: bool = False
    loss: LossFn | None = None

    @property
    def inputs(self) -> bool:
        """Whether the statistics pass over the layers' inputs runs."""
        return bool(self.powers) or self.hessian

    @property
    def passes(self) -> int:
        """Passes over the batches this request costs."""
        return int(self.inputs) + int(self.loss is not None)

    def merge(self, other: Request | None) -> Request:
        """One request collecting what both ask for (one loss at most)."""
        if other is None:
            return self
        if self.loss is not None and other.loss is not None and self.loss is not other.loss:
            raise ValueError("two calibration requests ask for gradients of different losses")
        return replace(self, powers=tuple(sorted({*self.powers, *other.powers})),
                       hessian=self.hessian or other.hessian, loss=self.loss or other.loss)


@dataclass
class Observed:
    """What :func:`observe` collected.

    Attributes:
        inputs: Target name -> input statistics (``None`` when no statistics pass ran).
        gradients: Target name -> ``sum_b |dL_b/dw|`` (``None`` without a loss).
        batches: Number of batches in the gradient pass.
        passes: Passes run over the batches.
    """

    inputs: dict[str, InputStats] | None = None
    gradients: dict[str, torch.Tensor] | None = None
    batches: int = 0
    passes: int = 0


def observe(model: nn.Module, batches: Iterable[Batch], targets: Sequence[Target],
            request: Request, *, progress: bool = True,
            stop_before: Sequence[Target] = ()) -> Observed:
    """Run the passes ``request`` asks for over ``batches``.

    Args:
        model: The model; its weights are not changed.
        batches: Calibration batches (read once per pass).
        targets: The layers to observe.
        request: What to collect.
        progress: Show progress bars.
        stop_before: Layers whose call ends a statistics pass early (sequential pruning).

    Raises:
        ValueError: as :func:`~secateurs.calibration.calibrate` and
            :func:`~secateurs.calibration.gradient_sums` do.
    """
    out = Observed()
    if request.inputs:
        out.inputs = calibrate(model, batches, targets, hessian=request.hessian,
                               powers=request.powers, progress=progress,
                               stop_before=stop_before)
        out.passes += 1
    if request.loss is not None:
        out.gradients, out.batches = gradient_sums(model, batches, targets, request.loss,
                                                   progress=progress)
        out.passes += 1
    return out
