"""The model families people prune, built from their real definitions (random init, small):
GPT-2's transposed ``Conv1D`` layers, channel pruning that never removes model outputs,
and a realised sparsity that says what the weights are."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.targets import resolve_targets

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=96,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _batches(n: int = 3, vocab: int = 96) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (2, 16), generator=g)} for _ in range(n)]


def _fresh(model: nn.Module) -> nn.Module:
    clone = type(model)(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def test_gpt2_default_targets_are_its_conv1d_layers_and_never_embeddings(gpt2):
    names = [t.name for t in resolve_targets(gpt2)]
    expected = [f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert names == expected
    assert all(t.transposed for t in resolve_targets(gpt2))
    assert not any("wte" in n or "wpe" in n for n in names)


def test_gpt2_tied_lm_head_is_named_as_tied_to_the_embedding(gpt2):
    with pytest.raises(ValueError, match=r"'lm_head' is tied to 'transformer\.wte\.weight'"):
        resolve_targets(gpt2, ["lm_head"])


def _inputs_of(model: nn.Module, layer: nn.Module, batches) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1,
                                                                                   a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    return torch.cat(seen)


def test_gpt2_two_four_runs_along_the_reduction_dimension_with_exact_error(gpt2):
    model, batches = _fresh(gpt2), _batches()
    layer = model.transformer.h[0].mlp.c_fc
    x = _inputs_of(model, layer, batches)
    before = layer.weight.detach().clone()
    report = sc.prune_(model, granularity="2:4", criterion="contribution",
                       calibration=batches, reconstruct=True, progress=False)
    for t in resolve_targets(model):
        w = t.param.detach()  # (in, out): every output's inputs, in groups of 4
        groups = (w.t() != 0).reshape(w.shape[1], -1, 4).sum(-1)
        assert bool((groups <= 2).all()), t.name
        assert report.masks[t.name].shape == w.shape
    # The reported error is the layer's real output error on its calibration inputs.
    after = layer.weight.detach()
    measured = float(((x @ (before - after)).double().norm() / (x @ before).double().norm()) ** 2)
    reported = next(r.relative_error for r in report.targets
                    if r.name == "transformer.h.0.mlp.c_fc.weight")
    assert reported == pytest.approx(measured, rel=1e-3)
    assert reported < 0.2


def test_gpt2_contribution_scores_weigh_each_input_feature(gpt2):
    model, batches = _fresh(gpt2), _batches(2)
    target = next(t for t in resolve_targets(model) if t.name.endswith("h.1.attn.c_proj.weight"))
    x = _inputs_of(model, target.module, batches)
    criterion = sc.criteria.Contribution(p=2)
    criterion.calibrate(model, [target], batches, progress=False)
    norm = x.double().pow(2).mean(0).sqrt()  # one value per input feature
    expected = target.param.detach().double().abs() * norm[:, None]  # (in, out) layout
    torch.testing.assert_close(criterion.score(target).double(), expected, rtol=1e-4, atol=1e-7)


def test_gpt2_trains_with_two_four_masks_along_its_inputs(gpt2):
    model = _fresh(gpt2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = sc.Pruner(model, None, "magnitude", granularity="2:4", optimizer=opt)
    for batch in _batches(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    for t in pruner.targets:
        groups = (t.param.detach().t() != 0).reshape(t.param.shape[1], -1, 4).sum(-1)
        assert bool((groups <= 2).all()), t.name
    assert pruner.sparsity() == pytest.approx(0.5)


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_channel_granularity_without_example_inputs_is_refused():
    model = _classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs example_inputs"):
        sc.Pruner(model, 0.5, "l1", granularity="channel")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_one_shot_channel_pruning_keeps_outputs_and_masks_biases():
    model = _classifier()
    x = torch.randn(32, 16)
    report = sc.prune_(model, 0.5, "contribution", [x[:16], x[16:]], granularity="channel",
                       scope="layer", progress=False)
    out_rows = model[2].weight.detach().abs().sum(1)
    assert bool((out_rows > 0).all()), "every class stays predictable"
    dead = model[0].weight.detach().abs().sum(1) == 0
    assert int(dead.sum()) == 16
    assert bool((model[0].bias.detach()[dead] == 0).all()), "a pruned neuron's bias goes too"
    assert bool((model[2].weight.detach()[:, dead] == 0).all())
    assert report.sparsity() == pytest.approx(0.5)
    with torch.no_grad():
        masked = model(x)
    small = sc.compact_(model, x[:2])
    assert small[0].out_features == 16 and small[2].out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked, atol=1e-5, rtol=0)


def _train(order: str, give_optimizer: bool = False
           ) -> tuple[sc.Pruner, list[warnings.WarningMessage]]:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # Without its optimizer the pruner cannot mask gradients: only the order of the calls
    # keeps the pruned weights at zero when the model runs.
    pruner = sc.Pruner(model, 0.8, optimizer=opt if give_optimizer else None)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if order == "wrong":
                pruner.step()
                opt.step()
            else:
                opt.step()
                pruner.step()
        pruner.sparsity()
    return pruner, caught


def test_step_before_optimizer_step_is_reported_as_dense_and_warned():
    pruner, caught = _train("wrong")
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert any("right after optimizer.step()" in m for m in messages), messages
    with pytest.warns(RuntimeWarning):
        assert pruner.sparsity() < 0.05
    assert "non-zero" in str(pruner.summary())
    assert sum(r.nonzero for r in pruner.summary()) > 0.9 * sum(r.params for r in
                                                                  pruner.summary())


def test_with_its_optimizer_the_pruner_masks_gradients_so_either_order_stays_pruned():
    for order in ("wrong", "right"):
        pruner, caught = _train(order, give_optimizer=True)
        assert not [w for w in caught if w.category is RuntimeWarning], order
        assert pruner.sparsity() == pytest.approx(0.8, abs=1 / 512), order


def test_step_after_optimizer_step_reports_the_masks_without_warning():
    pruner, caught = _train("right")
    assert not [w for w in caught if w.category is RuntimeWarning]
    assert pruner.sparsity() == pytest.approx(0.8, abs=1 / 512)
    assert pruner._order_hook is None  # checked a few times, then the hook went
