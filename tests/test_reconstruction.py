"""Weight reconstruction (SparseGPT's OBS update for a given mask)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secateurs.reconstruction import _update, inverse_cholesky, reconstruct, relative_error


def problem(seed: int, rows: int, features: int, samples: int, density: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, features, generator=g)
    # Correlated inputs: what reconstruction exploits.
    x = torch.randn(samples, features, generator=g) @ torch.randn(features, features, generator=g)
    mask = torch.rand(rows, features, generator=g) < density
    return w, x, x.T @ x / samples, mask


def output_error(w: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - new) @ x.T).square().sum() / (w @ x.T).square().sum())


@given(seed=st.integers(0, 10_000), rows=st.integers(1, 12), features=st.integers(2, 40),
       density=st.floats(0.2, 0.8), block=st.sampled_from([1, 3, 16, 64]),
       refine=st.sampled_from([0, 1, 20]))
def test_reconstruction_lowers_the_output_error_of_the_same_mask(seed, rows, features, density,
                                                                block, refine):
    w, x, h, mask = problem(seed, rows, features, 3 * features, density)
    rec = reconstruct(w, mask, h, percdamp=0.01, block_size=block, refine=refine)
    assert bool(torch.isfinite(rec.weight).all())
    assert bool((rec.weight[~mask] == 0).all())
    masked = torch.where(mask, w, 0.0)
    assert output_error(w, rec.weight, x) <= output_error(w, masked, x) + 1e-6


def reference(w: torch.Tensor, keep: torch.Tensor, upper: torch.Tensor, block: int
              ) -> torch.Tensor:
    """SparseGPT's column-by-column loop (Frantar & Alistarh 2023, Algorithm 1)."""
    w = w.clone().double()
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        w1, err1, u1 = w[:, i1:i2], torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype), \
            upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = torch.where(keep[:, i1 + i], w1[:, i], 0.0)
            err = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return torch.where(keep, w, 0.0)


@pytest.mark.parametrize("block", [1, 4, 16, 128])
def test_batched_solve_equals_the_column_by_column_loop(block):
    w, _, h, mask = problem(1, 7, 37, 120, 0.5)
    upper, _ = inverse_cholesky(h, 0.01)
    fast = w.double().clone()
    _update(fast, mask, upper, block)
    torch.testing.assert_close(torch.where(mask, fast, 0.0), reference(w, mask, upper, 32))


def test_rows_that_sparsegpt_makes_worse_are_masked_plainly():
    # Keeping only the middle column: the OBS update moves the pruned first column's
    # contribution onto it, then the third column goes without compensation, which here
    # is worse than plain masking.
    w = torch.tensor([[1.0, 1.0, -1.0]])
    x = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.9, 1.1], [0.0, 0.1, 1.0]])
    h = x.T @ x / 3
    mask = torch.tensor([[False, True, False]])
    upper, _ = inverse_cholesky(h, 0.01)
    obs = w.double().clone()
    _update(obs, mask, upper, 16)
    masked = torch.where(mask, w, 0.0)
    assert output_error(w, torch.where(mask, obs, 0.0).float(), x) > output_error(w, masked, x)
    rec = reconstruct(w, mask, h, refine=0)
    torch.testing.assert_close(rec.weight, masked)


def test_refinement_reaches_the_per_row_least_squares_optimum():
    w, x, h, mask = problem(9, 6, 24, 80, 0.5)
    rec = reconstruct(w, mask, h, percdamp=0.01, refine=60)
    a = h.double() + rec.damping * torch.eye(24, dtype=torch.float64)
    for r in range(w.shape[0]):
        k = mask[r].nonzero().flatten()
        best = torch.zeros(24, dtype=torch.float64)
        # Normal equations of min (w - v) A (w - v)^T over v supported on k.
        best[k] = torch.linalg.solve(a[k][:, k], w[r].double() @ a[:, k])
        torch.testing.assert_close(rec.weight[r].double(), best, rtol=1e-3, atol=1e-3)
    plain = reconstruct(w, mask, h, percdamp=0.01, refine=0)
    assert output_error(w, rec.weight, x) < output_error(w, plain.weight, x)


def test_upper_factor_inverts_the_damped_hessian():
    _, _, h, _ = problem(2, 1, 20, 60, 0.5)
    upper, damp = inverse_cholesky(h, 0.05)
    assert damp == pytest.approx(0.05 * float(h.diagonal().mean()))
    assert bool((upper.tril(-1) == 0).all())
    inv = torch.linalg.inv(h.double() + damp * torch.eye(20, dtype=torch.float64))
    torch.testing.assert_close(upper.T @ upper, inv)


def test_dead_features_keep_the_weights_the_mask_keeps():
    w, x, _, mask = problem(3, 5, 10, 40, 0.6)
    x[:, [2, 7]] = 0.0
    h = x.T @ x / 40
    rec = reconstruct(w, mask, h)
    assert rec.dead.nonzero().flatten().tolist() == [2, 7]
    assert bool(torch.isfinite(rec.weight).all())
    # Only the mask prunes: the weights of dead features it keeps are left as they were.
    assert torch.equal(rec.weight != 0, mask)
    dead = torch.zeros_like(mask)
    dead[:, [2, 7]] = True
    assert torch.equal(rec.weight[dead & mask], w[dead & mask])
    assert output_error(w, rec.weight, x) <= output_error(w, torch.where(mask, w, 0.0), x) + 1e-6


def test_an_all_zero_hessian_prunes_exactly_the_mask():
    w, _, _, mask = problem(7, 4, 8, 20, 0.5)
    rec = reconstruct(w, mask, torch.zeros(8, 8))
    assert bool(rec.dead.all())
    assert torch.equal(rec.weight, torch.where(mask, w, 0.0))


@pytest.mark.parametrize("kind", ["rank-one", "huge-range", "zero", "tiny"])
def test_ill_conditioned_hessians_never_give_nan(kind):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 16, generator=g)
    v = torch.randn(16, 1, generator=g)
    scales = torch.logspace(-30, 30, 16)
    h = {"rank-one": v @ v.T,
         "huge-range": torch.diag(scales.double()) + 1e-40,
         "zero": torch.zeros(16, 16),
         "tiny": (v @ v.T) * 1e-300}[kind]
    mask = torch.rand(6, 16, generator=g) < 0.5
    rec = reconstruct(w, mask, h, percdamp=0.0)
    assert bool(torch.isfinite(rec.weight).all())
    assert bool((rec.weight[~mask] == 0).all())
    assert math.isfinite(rec.damping)


def test_full_mask_leaves_weights_unchanged():
    w, _, h, _ = problem(5, 4, 12, 50, 0.5)
    rec = reconstruct(w, torch.ones_like(w, dtype=torch.bool), h)
    torch.testing.assert_close(rec.weight, w)
    assert relative_error(w, rec.weight, h) == 0.0


def test_relative_error_equals_the_output_error():
    w, x, h, mask = problem(6, 5, 9, 30, 0.5)
    new = torch.where(mask, w, 0.0)
    assert relative_error(w, new, h) == pytest.approx(output_error(w, new, x), rel=1e-5)
    assert relative_error(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3, 3)) == 0.0


def test_conv_weights_are_reconstructed_in_their_own_shape():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 2, 3, 3, generator=g)
    x = torch.randn(100, 18, generator=g)
    mask = torch.rand(4, 2, 3, 3, generator=g) < 0.5
    rec = reconstruct(w, mask, x.T @ x / 100)
    assert rec.weight.shape == w.shape and bool((rec.weight[~mask] == 0).all())


def test_bad_arguments_are_named():
    w, _, h, mask = problem(8, 3, 5, 20, 0.5)
    with pytest.raises(ValueError, match="torch.bool"):
        reconstruct(w, mask.float(), h)
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        reconstruct(w, mask, h[:4, :4])
    with pytest.raises(ValueError, match="NaN or Inf"):
        reconstruct(w, mask, h * float("nan"))
    with pytest.raises(ValueError, match="percdamp"):
        reconstruct(w, mask, h, percdamp=-1.0)
    with pytest.raises(ValueError, match="block_size"):
        reconstruct(w, mask, h, block_size=0)
    with pytest.raises(ValueError, match="refine"):
        reconstruct(w, mask, h, refine=-1)
