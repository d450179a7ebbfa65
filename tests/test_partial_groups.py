"""Channel pruning of models with a group it cannot resolve: every group that can go is
pruned, the rest keep their width with a reason (in ``kept_targets``, the summary and the
one-shot report); ``strict=True`` refuses instead. Recurrent layers are such groups."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secateurs as sc

transformers = pytest.importorskip("transformers")

RECURRENT = r"recurrent layers \(nn\.LSTM 'rnn'\) are not supported for channel pruning"


def _vit() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8)
    return transformers.ViTModel(config).eval(), torch.randn(2, 3, 32, 32)


def _convnext() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                         image_size=32)
    return transformers.ConvNextModel(config).eval(), torch.randn(2, 3, 32, 32)


def _widening(model: nn.Module, factor: int) -> dict[str, nn.Linear]:
    """The MLP's first layers: Linear layers ``factor`` times wider out than in."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.out_features == factor * m.in_features}


def _rows_alive(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).any(1)


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


@pytest.mark.parametrize(("build", "widening", "unresolved"), [
    (_vit, 2, "embeddings.position_embeddings"),
    (_convnext, 4, "layer_scale_parameter"),
], ids=["vit", "convnext"])
def test_unresolved_groups_keep_their_width_and_the_rest_is_pruned_exactly(
        build, widening, unresolved):
    model, x = build()
    mlp = _widening(model, widening)
    assert mlp
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x)
    pruner.update()
    pruner.close()
    for name in mlp:
        alive = _rows_alive(pruner.masks[f"{name}.weight"])
        assert int(alive.sum()) == alive.numel() // 2, name
    kept = pruner.kept_targets
    assert kept and all(reason for reason in kept.values())
    assert any(unresolved in reason for reason in kept.values())
    assert not set(kept) & {f"{n}.weight" for n in mlp}
    for name in kept:
        assert bool(_rows_alive(pruner.masks[name]).all()), name
    text = str(pruner.summary())
    assert "output channels kept" in text and unresolved in text
    assert pruner.summary().kept == kept
    masked = _outputs(model, x)
    params = sum(p.numel() for p in model.parameters())
    sc.compact_(model, x, masks=pruner.masks)
    assert all(m.out_features == widening * m.in_features // 2 for m in mlp.values())
    assert sum(p.numel() for p in model.parameters()) < params
    for key, value in _outputs(model, x).items():
        torch.testing.assert_close(value, masked[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("build", "unresolved"), [
    (_vit, "embeddings.position_embeddings"),
    (_convnext, "layer_scale_parameter"),
], ids=["vit", "convnext"])
def test_strict_refuses_unresolved_groups_before_any_change(build, unresolved):
    model, x = build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"cannot prune the output channels of .*{unresolved}"):
        sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x, strict=True)
    with pytest.raises(ValueError, match=unresolved):
        sc.prune_(model, 0.5, "l1", [x], granularity="channel", scope="layer", strict=True,
                  progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_one_shot_report_lists_kept_targets_with_reasons():
    model, x = _vit()
    report = sc.prune_(model, 0.5, "l1", [x], granularity="channel", scope="layer",
                       progress=False)
    assert report.kept and all(report.kept.values())
    assert set(report.kept) <= {r.name for r in report.targets}
    text = str(report)
    assert "output channels kept" in text and "position_embeddings" in text
    fc1 = [f"{n}.weight" for n in _widening(model, 2)]
    assert all(next(r for r in report.targets if r.name == n).sparsity == 0.5 for n in fc1)


def test_strict_must_be_a_bool():
    model, x = _convnext()
    with pytest.raises(TypeError, match="strict must be True or False"):
        sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x, strict=1)


# -- recurrent layers ----------------------------------------------------------------------

class _Recurrent(nn.Module):
    """Linear -> LSTM -> Linear -> Linear, on (batch, time, 4) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rnn(torch.relu(self.inp(x)))[0]
        return self.fc2(torch.relu(self.fc1(h)))


class _Tagger(nn.Module):
    """LSTM -> Linear head: nothing but the recurrent layer could lose channels."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def _sequence() -> torch.Tensor:
    return torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))


def test_lstm_beside_linear_layers_is_kept_with_its_reason_and_the_rest_pruned():
    torch.manual_seed(0)
    model, x = _Recurrent(), _sequence()
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x)
    pruner.update()
    pruner.close()
    assert [g.name for g in pruner.channel_groups] == ["fc1"]
    assert int(_rows_alive(pruner.masks["fc1.weight"]).sum()) == 8
    assert set(pruner.kept_targets) == {"inp.weight", "fc2.weight"}
    assert pruner.kept_targets["inp.weight"].startswith("recurrent layers (nn.LSTM 'rnn')")
    assert "element" in pruner.kept_targets["inp.weight"]
    assert "outputs of the model" in pruner.kept_targets["fc2.weight"]
    with torch.no_grad():
        masked = model(x)
    sc.compact_(model, x, masks=pruner.masks)
    assert model.fc1.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=RECURRENT):
        sc.Pruner(_Recurrent(), 0.5, "l1", granularity="channel", example_inputs=x,
                  strict=True)


@pytest.mark.parametrize("targets", [None, ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]],
                         ids=["head", "lstm"])
def test_nothing_to_prune_but_an_lstm_names_the_recurrent_layer(targets):
    torch.manual_seed(0)
    model = _Tagger()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"no target has output channels .*{RECURRENT}"):
        sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=_sequence(),
                  targets=targets)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU, nn.RNN])
def test_every_kept_target_has_a_reason(rnn):
    torch.manual_seed(0)
    model = _Recurrent()
    model.rnn = rnn(8, 8, batch_first=True)
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=_sequence())
    pruner.close()
    planned = {t for produced in pruner.plan.producers.values() for t in produced}
    assert planned | set(pruner.kept_targets) == {t.name for t in pruner.targets}
    assert all(r.strip() for r in pruner.kept_targets.values())
    assert f"nn.{rnn.__name__} 'rnn'" in pruner.kept_targets["inp.weight"]
    assert all(k.reason and k.targets for k in pruner.plan.kept)


def test_lstm_weights_are_pruned_by_element_and_n_m_when_named():
    torch.manual_seed(0)
    model, x = _Tagger(), _sequence()
    assert [t.name for t in sc.Pruner(model, 0.5).targets] == ["head.weight"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    names = ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    pruner = sc.Pruner(model, 0.5, targets=names, optimizer=opt)
    assert [t.name for t in pruner.targets] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        pruner.step()
    pruner.close()
    for name in ("weight_ih_l0", "weight_hh_l0"):
        weight = getattr(model.rnn, name)
        assert float((weight == 0).float().mean()) == 0.5
        assert torch.equal(weight == 0, ~pruner.masks[f"rnn.{name}"])
    # The LSTM computes with the pruned weights (its flat weight buffers are the same tensors).
    fresh = _Tagger()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), atol=0, rtol=0)
    nm = sc.Pruner(_Tagger(), None, granularity="2:4", targets=names)
    nm.step()
    nm.close()
    for name in ("rnn.weight_ih_l0", "rnn.weight_hh_l0"):
        kept = nm.masks[name].reshape(-1, 4).sum(1)
        assert bool((kept == 2).all()), name
