"""Classic value clipping of weights: clamp to ``[-c, c]`` and per-neuron max-norm.

These are the constraints users searching for "weight clipping" expect (Keras'
``MaxNorm``, WGAN's clamp); the *dynamic* clipping that zeroes small weights is the
``clipping`` criterion of :class:`~secateurs.Pruner`. Call :func:`clip_` right after
``optimizer.step()``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import validation as check
from .targets import TargetSpec, resolve_targets


@torch.no_grad()
def clip_(
    model: nn.Module,
    *,
    value: float | None = None,
    max_norm: float | None = None,
    targets: TargetSpec = None,
) -> None:
    """Clip target weights in place.

    Args:
        model: The model.
        value: Clamp every weight to ``[-value, value]``.
        max_norm: Rescale each output neuron / filter (row ``w[i]``) whose L2 norm exceeds
            ``max_norm`` down to ``max_norm`` (Srivastava et al. 2014), via ``Tensor.renorm_``.
        targets: Which weights; see :func:`secateurs.targets.resolve_targets`.

    Raises:
        ArgumentTypeError: if a bound is neither a number nor ``None``.
        ValueError: if neither bound is given, or one is not a finite positive number.
    """
    value = check.optional(check.number, "value", value, low=0.0, low_open=True)
    max_norm = check.optional(check.number, "max_norm", max_norm, low=0.0, low_open=True)
    if value is None and max_norm is None:
        raise ValueError("clip_ needs value=, max_norm=, or both")
    for t in resolve_targets(model, targets):
        p = t.param
        if max_norm is not None:
            p.renorm_(p=2, dim=0, maxnorm=max_norm)
        if value is not None:
            p.clamp_(-value, value)
