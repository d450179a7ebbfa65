"""Input features of a layer, as its weight sees them.

A layer's weight, flattened to ``(out, F)`` with ``weight.flatten(1)`` (after
:meth:`~secateurs.targets.Target.rows` for a transposed linear layer), multiplies an input
feature vector of length ``F``: the last dimension of a ``nn.Linear`` input, or one
unfolded patch (``in_channels * kh * kw``, channel slowest) of a convolution input. The
statistics of :mod:`secateurs.calibration` are per input feature, so each supported layer
type registers a :class:`FeatureMap` that turns the tensor it receives into those features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import is_transposed_linear


class FeatureMap(Protocol):
    """How one layer type's input becomes rows of input features."""

    def patches(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """All input feature vectors of ``x``, as a float32 matrix ``(n, F)``."""
        ...

    def power_sums(self, module: nn.Module, x: torch.Tensor,
                   powers: Sequence[float]) -> tuple[dict[float, torch.Tensor], int]:
        """``{p: sum_n |x_nj|^p}`` (float64, shape ``(F,)``) and ``n``, without keeping
        anything the size of :meth:`patches`."""
        ...


def _sums(x2d: torch.Tensor, powers: Sequence[float]) -> dict[float, torch.Tensor]:
    # vector_norm reduces without materialising |x|^p, which keeps per-step costs small.
    return {p: torch.linalg.vector_norm(x2d, ord=p, dim=0).double().pow(p) for p in powers}


class _LinearMap:
    def patches(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.detach().reshape(-1, x.shape[-1]).float()

    def power_sums(self, module: nn.Module, x: torch.Tensor,
                   powers: Sequence[float]) -> tuple[dict[float, torch.Tensor], int]:
        x2d = self.patches(module, x)
        return _sums(x2d, powers), x2d.shape[0]


@dataclass(frozen=True)
class _Geometry:
    """A convolution seen as ``unfold`` on a 4-D input (1-D convolutions get height 1)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]


def _geometry(module: nn.modules.conv._ConvNd) -> _Geometry:
    if len(module.kernel_size) == 1:
        return _Geometry((1, module.kernel_size[0]), (1, module.stride[0]),
                         (1, module.dilation[0]))
    k, s, d = module.kernel_size, module.stride, module.dilation
    return _Geometry((k[0], k[1]), (s[0], s[1]), (d[0], d[1]))


def _padded(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 4-D tensor with the module's own padding applied (any padding mode)."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    # The module's own padding list covers 'same', asymmetric and non-zero padding modes;
    # it is applied before reshaping, where F.pad supports every mode.
    x = F.pad(x.detach().float(), module._reversed_padding_repeated_twice, mode=mode)
    if len(module.kernel_size) == 1:
        x = x.unsqueeze(-2)  # 1-D convolution: (N, C, L) -> (N, C, 1, L)
    return x.unsqueeze(0) if x.dim() == 3 else x  # unbatched input


class _ConvMap:
    def patches(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        assert isinstance(module, nn.modules.conv._ConvNd)
        g = _geometry(module)
        cols = F.unfold(_padded(module, x), g.kernel, dilation=g.dilation, stride=g.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def power_sums(self, module: nn.Module, x: torch.Tensor,
                   powers: Sequence[float]) -> tuple[dict[float, torch.Tensor], int]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        g = _geometry(module)
        xp = _padded(module, x)
        out: dict[float, torch.Tensor] = {}
        locations = 0
        for p in powers:
            # Sum over the batch before unfolding: unfold is linear, so the patch sums are
            # exact while the unfolded tensor is one image, not the whole batch.
            z = torch.linalg.vector_norm(xp, ord=p, dim=0).pow(p).unsqueeze(0)
            cols = F.unfold(z, g.kernel, dilation=g.dilation, stride=g.stride)
            locations = cols.shape[-1]
            out[p] = cols[0].double().sum(1)
        return out, xp.shape[0] * locations


_LINEAR = _LinearMap()
_REGISTRY: dict[type[nn.Module], FeatureMap] = {
    nn.Linear: _LINEAR,
    nn.Conv1d: _ConvMap(),
    nn.Conv2d: _ConvMap(),
}


def register_feature_map(module_type: type[nn.Module], feature_map: FeatureMap) -> None:
    """Teach calibration the input features of another layer type (subclasses included)."""
    _REGISTRY[module_type] = feature_map


def feature_map(name: str, module: nn.Module) -> FeatureMap:
    """The :class:`FeatureMap` of ``module`` (the owner of target ``name``).

    Raises:
        TypeError: if no map is registered for the module's type or any of its bases.
        ValueError: for a grouped convolution, whose patches differ between groups.
    """
    if is_transposed_linear(module):
        return _LINEAR  # GPT-2's Conv1D: y = x @ W + b, features along x's last dimension
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
                raise ValueError(
                    f"target {name!r} is a grouped convolution (groups={module.groups}); input "
                    "statistics need groups=1: exclude it from targets"
                )
            return _REGISTRY[cls]
    known = ", ".join(sorted(c.__name__ for c in _REGISTRY))
    raise TypeError(f"target {name!r} belongs to a {type(module).__name__}, whose input features "
                    f"are unknown; supported layer types: {known} (see register_feature_map)")
