"""Weight reconstruction: after a mask is chosen, update the kept weights of a layer so that
its outputs on the calibration inputs change as little as possible.

The layer-wise problem is ``min_W' ||W X - W' X||_F^2`` with the pruned entries of ``W'``
fixed at zero; its Hessian is ``H = X^T X`` (up to a constant). The solver is the blockwise
Optimal Brain Surgeon update of SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot"), applied to a given mask: columns
are visited left to right; the error ``e = (w_j - q_j) / U_jj`` of pruning column ``j`` is
spread over the later columns through the upper Cholesky factor ``U`` of ``H^-1``
(``W[:, j:] -= e U[j, j:]``), within blocks of columns and then, for the whole block at once,
over the columns after it. Because that update only moves weights to the right of each
pruned one, a few conjugate-gradient iterations then bring each row to the least-squares
optimum for its mask (each row is an independent quadratic over its kept weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import validation as check

_MAX_DAMPING_STEPS = 8


@dataclass(frozen=True)
class Reconstructed:
    """What a :class:`Reconstruction` returns.

    Attributes:
        weight: The new weight, shaped and typed like the input weight, exactly zero where
            the mask is ``False``: its sparsity is the mask's.
        dead: Bool ``(F,)``: input features never active on the calibration inputs
            (``H_jj == 0``). Their weights affect no output on those inputs: the kept ones
            keep their values, the pruned ones are zero, as the mask says.
        damping: The damping ``lambda`` added to ``diag(H)`` (raised from
            ``percdamp * mean(diag H)`` when a Cholesky factorisation failed).
        relative_error: ``tr(dW H dW^T) / tr(W H W^T)`` of the new weight (see
            :func:`relative_error`), computed in float32.
    """

    weight: torch.Tensor
    dead: torch.Tensor
    damping: float
    relative_error: float


def inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1``, ``lambda = percdamp * mean(diag H)``.

    With ``J`` the order-reversing permutation and ``J H J = L L^T``,
    ``U = J L^-1 J`` satisfies ``U^T U = H^-1``: one factorisation and one triangular
    inverse, instead of inverting ``H`` and factorising the inverse. An ill-conditioned
    ``H`` can make the factorisation fail in floating point; ``lambda`` is then multiplied
    by 10 and the factorisation retried. If it still fails, the factor of the diagonal of
    ``H`` is returned, which makes the update plain masking (never NaN).

    Args:
        hessian: Symmetric positive semi-definite ``(F, F)`` with a positive diagonal.
        percdamp: Damping relative to the mean diagonal, ``>= 0``.

    Returns:
        ``U`` (float64, upper triangular) and the damping used.
    """
    h = hessian.double().flip(0, 1)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    scale = float(h.diagonal().mean())
    damp = percdamp * scale
    for _ in range(_MAX_DAMPING_STEPS):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inv = torch.linalg.solve_triangular(chol, eye, upper=False)
            if bool(torch.isfinite(inv).all()):
                return inv.flip(0, 1), damp
        damp = max(10.0 * damp, 1e-6 * scale)
    diag = hessian.double().diagonal() + damp
    return torch.diag(diag.rsqrt()), damp


@dataclass(frozen=True)
class Reconstruction:
    """Options of weight reconstruction; calling it reconstructs one layer.

    Three steps: SparseGPT's blockwise OBS update for the given mask; then ``refine``
    iterations of preconditioned conjugate gradients on each row's least-squares problem
    restricted to its kept weights, ``min_v (w - v) (H + lambda I) (w - v)^T``, whose
    optimum SparseGPT's one-directional update only approaches (CG decreases that
    objective at every iteration); last, any row whose output error on ``H`` came out
    above plain masking's is masked plainly, so the error never exceeds masking's.

    Attributes:
        percdamp: Damping ``lambda = percdamp * mean(diag H)``, ``>= 0``.
        block_size: Columns solved together, ``>= 1``; memory ``out * block_size^2`` floats.
        refine: Conjugate-gradient iterations after the OBS update, ``>= 0``. The default,
            20, reaches the optimum within a few percent on a pretrained encoder
            (``benchmarks/adaptive.py``); 0 is SparseGPT's update alone.

    Raises:
        ValueError: for an option out of range.
    """

    percdamp: float = 0.01
    block_size: int = 16
    refine: int = 20

    def __post_init__(self) -> None:
        check.number("percdamp", self.percdamp, low=0.0)
        check.integer("block_size", self.block_size, low=1)
        check.integer("refine", self.refine, low=0)

    def __call__(self, weight: torch.Tensor, mask: torch.Tensor,
                 hessian: torch.Tensor) -> Reconstructed:
        """Zero ``weight`` where ``mask`` is ``False`` and update the kept weights to minimise
        the layer's output error ``tr(dW H dW^T)``.

        Args:
            weight: ``(out, in, *kernel)``; flattened to ``(out, F)`` as the inputs are.
            mask: Bool, shaped like ``weight``; ``True`` = kept.
            hessian: ``X^T X / N`` of the layer's input features, ``(F, F)``.

        Raises:
            ValueError: on mismatched shapes or a non-finite Hessian.
        """
        _check(weight, mask, hessian)
        # The factorisation runs in float64 (ill-conditioned H); the updates, matrix
        # products over all rows, in float32 as SparseGPT's.
        original = weight.detach().flatten(1).float()
        h = hessian.detach().double().clone()
        dead = h.diagonal() == 0
        # A feature never active has a zero row and column in H: its weights change no
        # output on these inputs. SparseGPT sets H_jj = 1 and zeroes those weights, which
        # prunes beyond the mask (whole layers when every input is zero). Here the mask
        # decides: H_jj gets the mean of the live diagonal (H stays invertible, the damping
        # keeps its scale), the feature stays decoupled, so the OBS update and the
        # refinement leave its kept weights as they were and zero only its pruned ones.
        live = h.diagonal()[~dead]
        h.diagonal()[dead] = float(live.mean()) if live.numel() else 1.0
        keep = mask.flatten(1).to(original.device)
        upper, damp = inverse_cholesky(h, self.percdamp)
        w = original.clone()
        _update(w, keep, upper.float(), self.block_size)
        w = torch.where(keep, w, 0.0)
        if self.refine:
            h.diagonal().add_(damp)
            _refine(original, w, keep, h.float(), self.refine)
        w, error = _no_worse(original, w, keep, hessian.detach())
        return Reconstructed(w.reshape(weight.shape).to(weight.dtype), dead, damp, error)


def reconstruct(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor,
                **options: Any) -> Reconstructed:
    """``Reconstruction(**options)(weight, mask, hessian)``: see :class:`Reconstruction`."""
    return Reconstruction(**options)(weight, mask, hessian)


def _update(w: torch.Tensor, keep: torch.Tensor, upper: torch.Tensor, block_size: int) -> None:
    """SparseGPT's update for a fixed mask, in place on ``w`` (``(out, F)``).

    Within a block, SparseGPT's column-by-column recurrence
    ``e_j = (w_j - sum_{k<j} e_k U_kj) / U_jj`` (pruned ``j``; ``e_j = 0`` when kept) is the
    triangular system ``e_P U_PP = w_P`` over each row's pruned columns ``P``: it is solved
    for all rows at once, with ``U`` masked to ``P`` per row and the identity elsewhere.
    """
    features = w.shape[1]
    eye = torch.eye(block_size, dtype=w.dtype, device=w.device)
    for start in range(0, features, block_size):
        end = min(start + block_size, features)
        pruned = ~keep[:, start:end]
        both = pruned.unsqueeze(2) & pruned.unsqueeze(1)
        # Per row: U on the pruned rows and columns, the identity on the kept ones.
        system = torch.where(both, upper[start:end, start:end], eye[: end - start, : end - start])
        rhs = torch.where(pruned, w[:, start:end], 0.0).unsqueeze(1)
        err = torch.linalg.solve_triangular(system, rhs, upper=True, left=False).squeeze(1)
        w[:, start:] -= err @ upper[start:end, start:]


def relative_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W') X||_F^2 / ||W X||_F^2 = tr(dW H dW^T) / tr(W H W^T)``, from ``H = X^T X / N``.

    Returns ``0.0`` when both are zero and ``inf`` when only the denominator is.
    """
    w = weight.detach().flatten(1).double()
    dw = w - new_weight.detach().flatten(1).double()
    h = hessian.double()
    return _ratio(float(((dw @ h) * dw).sum()), float(((w @ h) * w).sum()))


def _refine(target: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, a: torch.Tensor,
            iterations: int) -> None:
    """Jacobi-preconditioned conjugate gradients, all rows at once, in place on ``w``:
    each row minimises ``(t - v) A (t - v)^T`` over its kept entries ``v``."""
    kept = keep.to(a.dtype)
    dinv = a.diagonal().reciprocal()
    r = ((target - w) @ a) * kept  # half the negative gradient, on the kept entries
    z = r * dinv
    p = z.clone()
    rz = (r * z).sum(1)
    for _ in range(iterations):
        ap = (p @ a) * kept
        curvature = (p * ap).sum(1)
        # A converged row has p = 0: its step is zero, not 0 / 0.
        alpha = torch.where(curvature > 0, rz / curvature, 0.0).unsqueeze(1)
        w.add_(alpha * p)
        r.sub_(alpha * ap)
        z = r * dinv
        rz_next = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_next / rz, 0.0).unsqueeze(1)
        p = z + beta * p
        rz = rz_next


def _no_worse(original: torch.Tensor, w: torch.Tensor, keep: torch.Tensor,
              hessian: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``w``, with every row whose output error exceeds plain masking's masked plainly, and
    the relative output error of the result (as :func:`relative_error`)."""
    h = hessian.to(w.dtype)
    masked = torch.where(keep, original, 0.0)

    def row_error(v: torch.Tensor) -> torch.Tensor:
        return ((v @ h) * v).sum(1).double()

    errors = torch.stack([row_error(original - w), row_error(original - masked)])
    worse = errors[0] > errors[1]
    return torch.where(worse.unsqueeze(1), masked, w), _ratio(float(errors.min(0).values.sum()),
                                                               float(row_error(original).sum()))


def _ratio(num: float, den: float) -> float:
    if den <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return max(num, 0.0) / den


def _check(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor) -> None:
    features = weight[0].numel() if weight.dim() >= 2 else -1
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"mask must be torch.bool shaped like the weight {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if hessian.shape != (features, features):
        raise ValueError(f"hessian must be ({features}, {features}) for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian holds NaN or Inf; the calibration inputs overflowed")
