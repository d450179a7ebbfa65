"""Streaming statistics of one layer's input features.

Memory is fixed by the statistics (``F`` values per power, ``F x F`` for ``X^T X``), never
by the number of batches: each batch is reduced as it arrives and then dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import validation as check
from .features import FeatureMap

DEFAULT_POWERS: tuple[float, ...] = (1.0, 2.0)


def check_power(p: object) -> float:
    """Return ``p``, the power of the input norm (1: ``sum |w x|``, 2: Wanda), as a float.

    Raises:
        ArgumentTypeError: if ``p`` is not a real number.
        ValueError: unless it is a finite number ``>= 1``.
    """
    return check.number("p", p, low=1.0)


def _finite(tensors: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def finite_power_sums(fmap: FeatureMap, module: nn.Module, x: torch.Tensor,
                      powers: Sequence[float]) -> tuple[dict[float, torch.Tensor], int] | None:
    """``fmap.power_sums(module, x, powers)`` that does not overflow: ``None`` when ``x``
    itself holds NaN or Inf (or its sums overflow even float64).

    The sums are reduced in float32; for finite inputs whose powers overflow it (``|x|``
    around ``1e19`` for ``p = 2``), ``x`` is scaled by a power of two (exact) so its largest
    element is below 1, and the sums are scaled back in float64. The check costs one
    reduction over the ``F`` sums.
    """
    sums, n = fmap.power_sums(module, x, powers)
    if _finite(list(sums.values())):
        return sums, n
    x = x.detach()
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        return None
    k = math.frexp(float(x.abs().max()))[1]  # max |x| < 2**k
    scaled, n = fmap.power_sums(module, x * 2.0 ** -k, powers)
    out = {p: s.double() * torch.exp2(torch.tensor(k * p, dtype=torch.float64, device=s.device))
           for p, s in scaled.items()}
    return (out, n) if _finite(list(out.values())) else None


@dataclass
class InputStats:
    """Per-input-feature sums over every feature vector ``x_n`` a layer has seen.

    Attributes:
        features: ``F``, the length of one feature vector (``weight.flatten(1).shape[1]``).
        count: ``N``, the number of feature vectors seen (tokens, samples or patches).
        power_sums: ``{p: sum_n |x_nj|^p}``, float64 of shape ``(F,)``; always holds
            ``p = 1`` (sums of ``|x|``) and ``p = 2`` (sums of ``x^2``).
        xtx: ``X^T X = sum_n x_n x_n^T``, float64 ``(F, F)``, when requested; else ``None``.
    """

    features: int
    count: int = 0
    power_sums: dict[float, torch.Tensor] = field(default_factory=dict)
    xtx: torch.Tensor | None = None

    @classmethod
    def empty(cls, features: int, powers: Sequence[float] = DEFAULT_POWERS,
              hessian: bool = False, device: torch.device | None = None) -> InputStats:
        """Zeroed statistics for ``features`` inputs, on ``device``."""
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        sums = {p: zeros(features) for p in sorted({*DEFAULT_POWERS, *map(float, powers)})}
        xtx = zeros(features, features) if hessian else None
        return cls(features, 0, sums, xtx)

    def add(self, sums: dict[float, torch.Tensor], count: int,
            patches: torch.Tensor | None = None) -> None:
        """Add one batch: its power sums, its number of vectors and, for ``X^T X``, the
        vectors themselves ``(n, F)``."""
        for p, total in self.power_sums.items():
            total.add_(sums[p])
        self.count += count
        if self.xtx is not None and patches is not None:
            # One float32 GEMM per batch (fast), accumulated across batches in float64; in
            # float64 when float32 overflows (finite inputs around 1e19 and larger).
            gram = (patches.T @ patches).double()
            if not bool(torch.isfinite(gram).all()) and bool(torch.isfinite(patches).all()):
                gram = patches.double().T @ patches.double()
            self.xtx.add_(gram)

    def norm(self, p: float) -> torch.Tensor:
        """``||x_j||_p = (sum_n |x_nj|^p)^(1/p)`` per input feature."""
        return self.power_sums[p].pow(1.0 / p)

    def mean_power(self, p: float) -> torch.Tensor:
        """``(1/N) sum_n |x_nj|^p``: the norm's ``p``-th power per vector seen."""
        return self.power_sums[p] / max(self.count, 1)

    def hessian(self) -> torch.Tensor:
        """``H = X^T X / N`` (the layer-wise squared-error Hessian up to a factor 2).

        Raises:
            ValueError: if ``X^T X`` was not collected.
        """
        if self.xtx is None:
            raise ValueError("X^T X was not collected; calibrate with hessian=True")
        return self.xtx / max(self.count, 1)

    def is_finite(self) -> bool:
        """Whether every statistic is finite (an overflowing activation makes them Inf)."""
        tensors = [*self.power_sums.values(), *([] if self.xtx is None else [self.xtx])]
        return all(bool(torch.isfinite(t).all()) for t in tensors)
