"""Counting parameters, MACs and bytes, against hand arithmetic and Torch-Pruning's counter;
the one-call structured path."""

from __future__ import annotations

import time

import pytest
import torch
import torch_pruning as tp
from torch import nn

import secateurs as sc
from secateurs.structured import count, latency, models, prune_channels_


def test_linear_and_conv_counts_match_the_arithmetic() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 4))
    c = count(model, torch.randn(2, 3, 5, 5))
    assert c.params == 8 * 27 + 8 + 200 * 4 + 4
    assert c.macs == 2 * (8 * 27 * 25 + 200 * 4)
    assert c.flops == 2 * c.macs and c.nonzero == c.params and c.bytes > c.params * 4
    macs, params = tp.utils.count_ops_and_params(model, torch.randn(1, 3, 5, 5))
    # Torch-Pruning's counter also counts bias additions and activations, one per element.
    assert params == c.params and c.macs / 2 <= macs <= c.macs / 2 + 8 * 25 + 4 + 200


def test_attention_scores_are_counted_and_masking_counts_only_nonzero() -> None:
    attn = models.SelfAttention(8, num_heads=2)
    c = count(attn, torch.randn(1, 5, 8))
    projections = 4 * 5 * 8 * 8
    assert c.macs == projections + 2 * 5 * 5 * 8  # q k^T and weights @ v
    with torch.no_grad():
        attn.q.weight[:4] = 0
    assert count(attn, torch.randn(1, 5, 8)).nonzero == c.params - 32


def test_count_restores_the_training_mode() -> None:
    model = models.MLP(4, (6,), 2).train()
    count(model, torch.randn(1, 4))
    assert model.training


def test_one_shot_prune_channels_compacts_and_counts() -> None:
    torch.manual_seed(0)
    model, x = models.ConvBN(width=8, classes=4, size=8), torch.randn(2, 1, 8, 8)
    result = prune_channels_(model, x, 0.5, "l1")
    assert result.model is model and model.features[0].out_channels == 4
    assert result.after.params < result.before.params / 3
    assert result.before.macs / result.after.macs > 3
    assert result.units["features.0"] == (8, 4)
    assert "fewer" in str(result)


def test_one_shot_with_calibration_for_contribution() -> None:
    torch.manual_seed(0)
    model, x = models.MLP(6, (10,), 3), torch.randn(4, 6)
    with pytest.raises(ValueError, match="calibration"):
        prune_channels_(models.MLP(6, (10,), 3), x, 0.5, "contribution")
    result = prune_channels_(model, x, 0.5, "contribution", calibration=[torch.randn(8, 6)])
    assert model[0].out_features == 5 and result.units == {"0": (10, 5)}


def test_gradual_prune_channels_trains_and_rebinds_the_optimizer() -> None:
    torch.manual_seed(0)
    model, x = models.MLP(6, (16, 16), 3), torch.randn(4, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def train_step(step: int) -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 6, generator=g)),
                                    torch.randint(0, 3, (8,), generator=g)).backward()
        opt.step()

    result = prune_channels_(model, x, 0.75, "l1", train_step=train_step, steps=12,
                             optimizer=opt)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [4, 4, 3]
    assert result.after.macs < result.before.macs / 4
    assert set(opt.state) == set(model.parameters())
    train_step(12)  # training continues on the compacted model


def test_prune_channels_checks_its_arguments_and_the_model_first() -> None:
    model, x = models.MLP(6, (8,), 3), torch.randn(2, 6)
    with pytest.raises(ValueError, match="train_step"):
        prune_channels_(model, x, 0.5, steps=3)
    with pytest.raises(ValueError, match="steps"):
        prune_channels_(model, x, 0.5, steps=-1)
    flip = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), _Reverse(), nn.Linear(8, 3))
    weights = [p.clone() for p in flip.parameters()]
    with pytest.raises(sc.structured.CompactionError):
        prune_channels_(flip, x, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(weights, flip.parameters(), strict=True))


class _Reverse(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1)


def test_latency_times_models_against_the_first_and_restores_modes() -> None:
    a, b = models.MLP(8, (64,), 2).train(), models.MLP(8, (4,), 2).eval()
    first, second = latency([a, b], torch.randn(4, 8), rounds=2, calls=2, warmup=1)
    assert first.speedup == 1.0 and first.ms > 0 and second.ms > 0 and second.speedup > 0
    assert a.training and not b.training
    cpu = latency([a, b], torch.randn(4, 8), rounds=1, calls=1, clock=time.process_time)
    assert cpu[0].speedup == 1.0 and cpu[1].ms >= 0
    with pytest.raises(ValueError, match="rounds"):
        latency([a], torch.randn(4, 8), rounds=0)
