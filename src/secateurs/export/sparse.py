"""Sparse execution on CPU: ``nn.Linear`` weights stored in CSR, where that is measured faster.

A CSR matrix product ``y = W x`` costs time in proportion to the non-zeros, but with
irregular memory access, and it does not reach the throughput of a dense BLAS GEMM; it
wins only at high sparsity, and where exactly depends on the shape, the batch, the
threads and the machine. So :func:`sparsify_` decides per layer by measuring: it times
the layer's own weight, dense (``F.linear``) against CSR (``torch.addmm`` with a
``torch.sparse_csr_tensor``), on a batch of the size you will run, on this machine, now,
and swaps in :class:`SparseLinear` only where CSR is faster by a margin. Inference only:
:class:`SparseLinear` has no trainable parameters.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import TargetSpec, resolve_targets

__all__ = ["LayerTiming", "SparseLinear", "SparseReport", "sparsify_"]


def _csr(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and measured
        warnings.simplefilter("ignore", UserWarning)
        return weight.detach().to_sparse_csr()


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored in CSR (compressed sparse rows), for inference.

    Computed as ``addmm(b, W, x^T)^T``: CSR times a dense matrix, whose cost grows with the
    non-zeros of ``W``. The buffers ``crow_indices``, ``col_indices`` (32-bit where they
    fit) and ``values`` (the weight's dtype) hold ``W``: ``nnz * (4 + 4) + 4 * (out + 1)``
    bytes for float32, less than the dense ``4 * out * in`` above 50% sparsity. The module
    moves, casts and saves like any other.

    Args:
        weight: The dense ``(out_features, in_features)`` weight, zeros included.
        bias: The bias, or ``None``.
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape "
                             f"{tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        csr = _csr(weight)
        # 32-bit indices where they fit: half the index memory, and the form MKL's sparse
        # kernels take without converting on every call (measured faster here).
        index = torch.int32 if weight.numel() < 2**31 else torch.int64
        self.register_buffer("crow_indices", csr.crow_indices().to(index))
        self.register_buffer("col_indices", csr.col_indices().to(index))
        self.register_buffer("values", csr.values())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """The CSR counterpart of ``linear`` (same outputs, up to summation order)."""
        return cls(linear.weight, linear.bias)

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) weights."""
        return int(self.values.numel())

    def weight_csr(self) -> torch.Tensor:
        """The weight as a ``torch.sparse_csr_tensor`` (a view of the buffers)."""
        # Built from our own buffers, whose invariants to_sparse_csr established.
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       (self.out_features, self.in_features),
                                       check_invariants=False)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        # The number of non-zeros is data, not structure: buffers take the incoming sizes.
        # forward skips the CSR invariant checks, so indices read from a file are checked
        # here first: out-of-range indices would make the kernel read outside its buffers.
        parts = {k: state_dict.get(prefix + k) for k in ("crow_indices", "col_indices", "values")}
        crow, col, values = parts.values()
        if isinstance(crow, torch.Tensor) and isinstance(col, torch.Tensor) \
                and isinstance(values, torch.Tensor):
            try:
                torch.sparse_csr_tensor(crow, col, values, (self.out_features, self.in_features),
                                        check_invariants=True)
            except RuntimeError as err:
                raise ValueError(f"{prefix or 'SparseLinear'}: CSR buffers in the state_dict "
                                 f"are invalid for shape ({self.out_features}, "
                                 f"{self.in_features}): {err}") from None
            for name, t in (("crow_indices", crow), ("col_indices", col), ("values", values)):
                old = getattr(self, name)
                setattr(self, name, t.detach().to(old.device, old.dtype, copy=True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input of shape {tuple(x.shape)} has {x.shape[-1]} features, "
                             f"this layer takes {self.in_features}")
        flat = x.reshape(-1, self.in_features).t()
        w = self.weight_csr()
        y = torch.mm(w, flat) if self.bias is None else \
            torch.addmm(self.bias.unsqueeze(1), w, flat)
        return y.t().reshape(*x.shape[:-1], self.out_features)

    def to_linear(self) -> nn.Linear:
        """Back to a dense ``nn.Linear``."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight_csr().to_dense())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity={1 - density:.1%}")


@dataclass(frozen=True)
class LayerTiming:
    """One layer's measurement and decision in :func:`sparsify_`.

    Attributes:
        name: The module's name.
        shape: ``(out_features, in_features)``.
        sparsity: Fraction of zeros in the weight.
        dense_ms: Median time of the dense layer on the measured batch (``nan`` if skipped).
        sparse_ms: Median time of the CSR layer (``nan`` if skipped).
        swapped: Whether the layer was replaced by :class:`SparseLinear`.
        reason: Why: ``"faster"``, ``"slower"``, ``"below min_sparsity"``, ``"not on CPU"``.
    """

    name: str
    shape: tuple[int, int]
    sparsity: float
    dense_ms: float
    sparse_ms: float
    swapped: bool
    reason: str

    @property
    def speedup(self) -> float:
        """``dense_ms / sparse_ms`` (above 1: CSR is faster)."""
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else math.nan


class SparseReport(list[LayerTiming]):
    """Rows of :class:`LayerTiming`; ``str()`` renders a table."""

    def __str__(self) -> str:
        head = ("layer", "shape", "sparsity", "dense ms", "CSR ms", "speedup", "decision")
        cells = [(r.name, "x".join(map(str, r.shape)), f"{r.sparsity:.1%}", f"{r.dense_ms:.3f}",
                  f"{r.sparse_ms:.3f}", f"{r.speedup:.2f}x",
                  ("CSR" if r.swapped else "dense") + f" ({r.reason})") for r in self]
        widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
        lines = ["  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True))
                 for c in [head, *cells]]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def time_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in interleaved rounds.

    Each sample repeats a call enough times to last about 2 ms, so timer resolution does
    not dominate small layers; rounds alternate the functions so machine noise hits all.
    """
    inner = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        inner[name] = max(1, math.ceil(2e-3 / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: 1e3 * sorted(s)[len(s) // 2] for name, s in samples.items()}


def _check_options(batch_size: object, min_sparsity: object, margin: object,
                   repeats: object) -> None:
    def integer(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def fraction(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not 0 <= float(value) < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")

    integer("batch_size", batch_size)
    integer("repeats", repeats)
    fraction("min_sparsity", min_sparsity)
    fraction("margin", margin)


@torch.inference_mode()
def _measure(name: str, linear: nn.Linear, batch_size: int, min_sparsity: float,
             margin: float, repeats: int) -> LayerTiming:
    w = linear.weight
    sparsity = 1.0 - int(torch.count_nonzero(w)) / w.numel()
    shape = (linear.out_features, linear.in_features)
    if w.device.type != "cpu":
        return LayerTiming(name, shape, sparsity, math.nan, math.nan, False, "not on CPU")
    if sparsity < min_sparsity:
        return LayerTiming(name, shape, sparsity, math.nan, math.nan, False,
                           "below min_sparsity")
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    x = torch.randn(batch_size, linear.in_features, generator=gen).to(w.dtype)
    sparse = SparseLinear.from_linear(linear)
    ms = time_ms({"dense": lambda: F.linear(x, w, linear.bias), "csr": lambda: sparse(x)},
                 repeats)
    faster = ms["csr"] < ms["dense"] * (1.0 - margin)
    return LayerTiming(name, shape, sparsity, ms["dense"], ms["csr"], faster,
                       "faster" if faster else "slower")


def sparsify_(
    model: nn.Module,
    *,
    batch_size: int = 64,
    min_sparsity: float = 0.5,
    margin: float = 0.1,
    targets: TargetSpec = None,
    repeats: int = 7,
) -> SparseReport:
    """Swap sparse ``nn.Linear`` layers for :class:`SparseLinear` where CSR is measured faster.

    For each ``nn.Linear`` among ``targets`` whose weight has at least ``min_sparsity``
    zeros, time the dense layer and its CSR counterpart on a random batch of
    ``batch_size`` rows (the rows a call will see: batch times sequence length), with the
    current ``torch.get_num_threads()``; swap when CSR takes less than ``1 - margin`` of
    the dense time. The decision holds for this machine and batch size: measure again
    elsewhere.

    Args:
        model: Changed in place (modules replaced); no weight value changes.
        batch_size: Rows of the timed input.
        min_sparsity: Layers below it are not timed (CSR never pays there).
        margin: Required relative gain, in ``[0, 1)``; guards against timing noise.
        targets: Which layers (default: every ``nn.Linear`` weight).
        repeats: Timed rounds per layer (the median is used).

    Returns:
        One row per candidate layer: timings, speedup and decision.

    Raises:
        ValueError: for invalid options, targets that hold no ``nn.Linear`` submodule, or
            a model that is itself the only layer (use :meth:`SparseLinear.from_linear`).
    """
    _check_options(batch_size, min_sparsity, margin, repeats)
    layers = {t.module_name: t.module for t in resolve_targets(model, targets)
              if t.param_name == "weight"}
    linears = {name: m for name, m in layers.items() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"targets={targets!r} hold no nn.Linear weight of the model")
    if "" in linears:
        raise ValueError("the model itself is an nn.Linear and cannot be swapped in place; "
                         "use SparseLinear.from_linear(model)")
    report = SparseReport(_measure(name, m, int(batch_size), float(min_sparsity),
                                   float(margin), int(repeats)) for name, m in linears.items())
    for row in report:
        if row.swapped:
            parent_name, _, child = row.name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    SparseLinear.from_linear(linears[row.name]))
    return report
