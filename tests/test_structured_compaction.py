"""Compaction: the compacted model computes what the masked model computed (invariant 5),
has the parameters the arithmetic says, carries its optimizer state over, and refuses
networks it cannot compact exactly without touching them."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs as sc
from secateurs.structured import CompactionError, check_compactable, compact_, models

ATOL = 1e-5


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so a forgotten slice shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
    return model


CASES = {
    "mlp": (lambda: models.MLP(12, (24, 20), 5), (4, 12)),
    "cnn_bn": (lambda: models.ConvBN(width=6, classes=5, size=8), (3, 1, 8, 8)),
    "resnet": (lambda: models.ResNetLike((6, 10), blocks=1, classes=5), (3, 3, 12, 12)),
    "mobilenet": (lambda: models.MobileNetLike(width=6, classes=5, expand=2), (3, 3, 12, 12)),
    "transformer": (lambda: models.TransformerClassifier(8, dim=16, num_heads=4, hidden=24,
                                                         classes=5), (3, 5, 8)),
}


def _pruned(kind: str, sparsity: float = 0.5, criterion: str = "l1", scope: str = "layer",
            seed: int = 0) -> tuple[nn.Module, torch.Tensor, sc.Pruner]:
    build, shape = CASES[kind]
    torch.manual_seed(seed)
    model = _randomise_norms(build(), seed)
    x = torch.randn(*shape)
    pruner = sc.Pruner(model, sparsity, criterion, scope=scope, granularity="channel",
                       example_inputs=x)
    pruner.update()
    return model.eval(), x, pruner


@pytest.mark.parametrize("kind", sorted(CASES))
def test_compacted_outputs_equal_masked_outputs(kind: str) -> None:
    model, x, pruner = _pruned(kind)
    with torch.no_grad():
        masked = model(x)
    before = sum(p.numel() for p in model.parameters())
    compact_(model, x, pruner.masks)
    with torch.no_grad():
        compacted = model(x)
    assert sum(p.numel() for p in model.parameters()) < before
    torch.testing.assert_close(compacted, masked, atol=ATOL, rtol=0)


def test_transformer_loses_whole_heads_and_updates_the_head_count() -> None:
    model, x, pruner = _pruned("transformer")
    attn = model.blocks[0].attn
    compact_(model, x, pruner.masks)
    assert attn.num_heads == 2  # half of 4 heads
    assert attn.q.out_features == attn.k.out_features == attn.v.out_features == 2 * attn.head_dim
    assert attn.out.in_features == 2 * attn.head_dim
    assert model.blocks[0].fc1.out_features == 12
    assert model.embed.out_features == 16  # the LayerNorm-normalised width stays


def test_parameter_counts_match_the_arithmetic() -> None:
    torch.manual_seed(0)
    model = models.MLP(16, (32, 32), 4)
    x = torch.randn(2, 16)
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x)
    pruner.update()
    compact_(model, x, pruner.masks)
    # 16 -> 16 -> 16 -> 4: weights and biases.
    assert sum(p.numel() for p in model.parameters()) == (16 * 16 + 16) * 2 + 16 * 4 + 4

    torch.manual_seed(0)
    cnn = models.ConvBN(width=8, classes=10, size=8)
    x = torch.randn(2, 1, 8, 8)
    pruner = sc.Pruner(cnn, 0.25, "l1", granularity="channel", example_inputs=x)
    pruner.update()
    compact_(cnn, x, pruner.masks)
    c1, c2, hidden = 6, 12, 48  # 8, 16, 64 units less a quarter
    expected = (c1 * 9 + 2 * c1) + (c2 * c1 * 9 + 2 * c2) + (c2 * 4 * hidden + hidden) \
        + (hidden * 10 + 10)
    assert sum(p.numel() for p in cnn.parameters()) == expected


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
])
def test_optimizer_state_after_rebinding_is_the_slice_of_the_old_state(make) -> None:
    torch.manual_seed(0)
    model = models.MLP(10, (12,), 3)
    x = torch.randn(6, 10)
    opt = make(model.parameters())
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x,
                       optimizer=opt)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        pruner.step()
    names = dict(model.named_parameters())
    old = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in names.items()}
    masks = {n: pruner.masks[n].clone() if n in pruner.masks else torch.ones_like(p, dtype=bool)
             for n, p in names.items()}
    compact_(model, x, pruner.masks, optimizer=opt)
    params = dict(model.named_parameters())
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params.values()]
    for n, p in params.items():
        m = masks[n]
        for key, value in old[n].items():
            if value.dim() == 0:
                assert torch.equal(opt.state[p][key], value)
                continue
            rows = m.reshape(m.shape[0], -1).any(1)
            expected = value[rows] if value.dim() == 1 else value[rows][:, m.any(0)]
            assert torch.equal(opt.state[p][key], expected), (n, key)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()  # training continues on the compacted model
    assert all(torch.isfinite(p).all() for p in model.parameters())


class CustomConv(nn.Module):
    """A convolution held as a raw parameter, outside the layers Torch-Pruning knows."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.kernel, padding=1)


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.custom = CustomConv(8, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.custom(torch.relu(self.conv(x))).mean((2, 3)))


def test_unresolvable_layer_raises_naming_it_and_leaves_the_model_unchanged() -> None:
    torch.manual_seed(0)
    model, x = Custom(), torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="custom.kernel"):
        sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x)
    masks = {"conv.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool)}
    masks["conv.weight"][:4] = False
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(CompactionError, match="custom.kernel"):
        compact_(model, x, masks)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.conv.out_channels == 8


class Flip(nn.Module):
    """Reverses the channel order: an operation the dependency graph takes as elementwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)


def test_operation_the_graph_misreads_is_caught_and_named() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Flip(),
                          nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 2))
    x = torch.randn(2, 3, 6, 6)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(CompactionError, match=r"layer '3'"):
        check_compactable(model, x)
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x,
                       targets=["0.weight"])
    pruner.update()
    with pytest.raises(CompactionError, match="changes"):
        compact_(model, x, pruner.masks)
    assert model[0].out_channels == 8 and model[3].in_channels == 8
    assert sum(torch.count_nonzero(v) for v in state.values()) > \
        sum(torch.count_nonzero(v) for v in model.state_dict().values())  # masked, not cut


def test_masks_that_leave_batchnorm_active_are_refused() -> None:
    torch.manual_seed(0)
    model = _randomise_norms(models.ConvBN(width=6, classes=5, size=8)).eval()
    x = torch.randn(2, 1, 8, 8)
    # Row masks on the targets alone: the BatchNorm shift of a removed channel still acts.
    targets = sc.targets.resolve_targets(model)
    rows = sc.selection.select({t.name: t.param.detach().abs() for t in targets},
                               dict.fromkeys((t.name for t in targets), 0.5),
                               sc.selection.parse_granularity("channel"), "layer")
    with torch.no_grad():
        for t in targets:
            t.param.mul_(rows[t.name])
    with pytest.raises(CompactionError, match="features"):
        compact_(model, x, rows)
    assert model.features[0].out_channels == 6


def test_masks_none_removes_all_zero_channels_only() -> None:
    torch.manual_seed(0)
    model = models.MLP(6, (8,), 3).eval()
    with torch.no_grad():
        model[0].weight[[1, 5]] = 0
        model[0].bias[[1, 5]] = 0
        model[0].weight[2, :3] = 0  # partly zero: stays
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = model(x)
    compact_(model, x)
    assert model[0].out_features == 6 and model[2].in_features == 6
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=ATOL, rtol=0)


def test_nothing_to_remove_leaves_the_same_parameters() -> None:
    model = models.MLP(6, (8,), 3)
    ids = [id(p) for p in model.parameters()]
    assert compact_(model, torch.randn(2, 6)) is model
    assert [id(p) for p in model.parameters()] == ids


def test_bad_masks_raise_before_anything_changes() -> None:
    model = models.MLP(6, (8,), 3)
    with pytest.raises(ValueError, match="names no parameter"):
        compact_(model, torch.randn(2, 6), {"nope.weight": torch.ones(8, 6, dtype=torch.bool)})
    with pytest.raises(TypeError, match="torch.bool"):
        compact_(model, torch.randn(2, 6), {"0.weight": torch.ones(8, 6)})


class Concat(nn.Module):
    """Two branches concatenated along channels, a grouped convolution, a flatten."""

    def __init__(self, grouped_reads_concat: bool = False) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.mix = nn.Identity() if grouped_reads_concat else \
            nn.Sequential(nn.Conv2d(10, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(10 if grouped_reads_concat else 8, 8, 3,
                                               padding=1, groups=2),
                                     nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.grouped(self.mix(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(nn.functional.avg_pool2d(y, 2).flatten(1))


@pytest.mark.parametrize("grouped_reads_concat", [False, True])
def test_concatenation_grouped_convolution_and_flatten(grouped_reads_concat: bool) -> None:
    torch.manual_seed(0)
    model = _randomise_norms(Concat(grouped_reads_concat)).eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x)
    pruner.update()
    with torch.no_grad():
        masked = model(x)
    compact_(model, x, pruner.masks)
    conv = model.grouped[0]
    assert conv.groups == 2 and conv.out_channels == 4 and model.fc.in_features == 4 * 16
    if grouped_reads_concat:
        # Its inputs come from two groups that would have to shrink in step: both stay.
        assert conv.in_channels == 10 and model.a[0].out_channels == 6
    else:
        assert conv.in_channels == 4 and model.a[0].out_channels == 3
        assert model.mix[0].in_channels == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=ATOL, rtol=0)


def test_multihead_attention_keeps_its_width_and_the_mlp_shrinks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16),
                          nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
                          nn.Linear(16, 3)).eval()
    x = torch.randn(2, 5, 6)
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x)
    assert [g.name for g in pruner.channel_groups] == ["1.linear1"]
    pruner.update()
    with torch.no_grad():
        masked = model(x)
    compact_(model, x, pruner.masks)
    assert model[1].linear1.out_features == 16 and model[1].self_attn.embed_dim == 16
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=ATOL, rtol=0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(CASES)), sparsity=st.floats(0.0, 0.9),
       scope=st.sampled_from(["layer", "global"]),
       criterion=st.sampled_from(["l1", "l2", "magnitude", "random"]),
       seed=st.integers(0, 2**16))
def test_property_compaction_is_exact(kind: str, sparsity: float, scope: str, criterion: str,
                                      seed: int) -> None:
    model, x, pruner = _pruned(kind, sparsity, criterion, scope, seed)
    with torch.no_grad():
        masked = model(x)
    compact_(model, x, pruner.masks)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=ATOL, rtol=0)
    kept = {g.name: int((~g.off(pruner.masks)).sum()) for g in pruner.channel_groups}
    assert all(k >= 1 for k in kept.values())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(2, 24), min_size=1, max_size=3),
       sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 2**16))
def test_property_mlp_widths_follow_the_sparsity(widths: list[int], sparsity: float,
                                                 seed: int) -> None:
    torch.manual_seed(seed)
    model = models.MLP(5, tuple(widths), 3).eval()
    x = torch.randn(3, 5)
    pruner = sc.Pruner(model, sparsity, "l1", granularity="channel", example_inputs=x)
    pruner.update()
    with torch.no_grad():
        masked = model(x)
    compact_(model, x, pruner.masks)
    got = [m.out_features for m in model if isinstance(m, nn.Linear)][:-1]
    assert got == [max(1, w - round(sparsity * w)) for w in widths]
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_hugging_face_bert_loses_heads_and_intermediate_neurons() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    x = {"input_ids": torch.randint(0, 100, (2, 8)),
         "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x)
    pruner.update()
    with torch.no_grad():
        masked = model(**x).last_hidden_state
    compact_(model, x, pruner.masks)
    attention = model.encoder.layer[0].attention.self
    assert attention.num_attention_heads == 2 and attention.query.out_features == 16
    assert model.encoder.layer[0].intermediate.dense.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(model(**x).last_hidden_state, masked, atol=ATOL, rtol=0)
