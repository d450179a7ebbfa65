"""Channel pruning of language models: attention heads and MLP neurons of real Hugging Face
decoder classes (Llama with multi-head and grouped-query attention, Mistral, Qwen2, GPT-2),
compacted exactly, with the configuration following and greedy generation unchanged; the
residual stream stays; no step of the search runs unbounded."""

from __future__ import annotations

import copy
import logging
import time

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.graph import blocks, discover
from secateurs.graph.layers import BlockPruner, NormPruner, TransposedLinearPruner

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def _llama(kv_heads: int = 2, family: str = "Llama", **extra: object) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=64, **extra)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=96,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1))


def _generate(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)


def _prune_and_compact(model: nn.Module, ids: torch.Tensor, sparsity: float = 0.5
                       ) -> tuple[sc.Pruner, torch.Tensor, torch.Tensor]:
    """The user path: channel Pruner, then compaction; returns the masked model's logits
    and greedy tokens (computed between the two)."""
    x = {"input_ids": ids}
    pruner = sc.Pruner(model, sparsity, "l1", granularity="channel", scope="layer",
                       example_inputs=x)
    pruner.update()
    with torch.no_grad():
        logits = model(**x).logits
    tokens = _generate(model, ids)
    sc.compact_(model, x, masks=pruner.masks)
    return pruner, logits, tokens


def _check_same(model: nn.Module, ids: torch.Tensor, logits: torch.Tensor,
                tokens: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=ATOL, rtol=0)
    assert torch.equal(_generate(model, ids), tokens)


# -- Llama family -------------------------------------------------------------------------------

def test_llama_units_are_key_value_groups_and_neurons_and_the_residual_stream_stays() -> None:
    model = _llama(kv_heads=2)
    groups = {g.name: g for g in discover(model, {"input_ids": _ids(128)}).groups}
    attn = groups["model.layers.0.self_attn.q_proj"]
    prefix = "model.layers.0.self_attn."
    assert all(attn.produces(f"{prefix}{p}_proj.weight") for p in "qkv")
    assert {s.param for s in attn.slices if s.role == "in"} == {f"{prefix}o_proj.weight"}
    # 4 query heads of 16 channels over 2 key/value heads: a unit is one key/value head
    # with the 2 query heads reading it.
    assert attn.prunable and attn.units == 2
    assert torch.equal(attn.unit_of, torch.arange(64) // 32)
    key = next(s for s in attn.slices if s.param == f"{prefix}k_proj.weight")
    assert torch.equal(attn.unit_of[key.channel], torch.arange(32) // 16)
    mlp = groups["model.layers.0.mlp.gate_proj"]
    assert mlp.prunable and mlp.units == 128 and mlp.produces("model.layers.0.mlp.up_proj.weight")
    stream = groups["model.embed_tokens"]
    assert stream.fixed is not None and "LlamaRMSNorm" in stream.fixed
    assert stream.produces("model.layers.0.self_attn.o_proj.weight")
    assert stream.produces("model.layers.1.mlp.down_proj.weight")
    assert groups["lm_head"].fixed is not None and "outputs" in groups["lm_head"].fixed
    assert sum(g.prunable for g in groups.values()) == 4


def test_grouped_query_llama_prunes_in_seconds_and_says_what_it_does(
        caplog: pytest.LogCaptureFixture) -> None:
    model = _llama(kv_heads=2)
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="secateurs.graph"):
        pruner, _, _ = _prune_and_compact(model, _ids(128))
    assert time.perf_counter() - start < 30  # Torch-Pruning alone ran for over 10 minutes
    assert "2 attention and 2 MLP blocks recognised" in caplog.text
    assert "tracing LlamaForCausalLM" in caplog.text
    assert len(pruner.plan.groups) == 4


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_llama_compacts_exactly_and_generates_what_the_masked_model_does(kv_heads: int
                                                                         ) -> None:
    model = _llama(kv_heads)
    ids = _ids(128)
    _, logits, tokens = _prune_and_compact(model, ids)
    _check_same(model, ids, logits, tokens)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.out_features == attn.o_proj.in_features == 2 * 16
        assert attn.k_proj.out_features == attn.v_proj.out_features == kv_heads // 2 * 16
        assert attn.num_key_value_groups == 4 // kv_heads and attn.head_dim == 16
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == 64
        assert mlp.down_proj.in_features == mlp.intermediate_size == 64
        assert layer.input_layernorm.weight.shape == (64,)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, kv_heads // 2)
    assert config.intermediate_size == 64 and config.head_dim == 16 and config.hidden_size == 64


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_a_model_rebuilt_from_the_compacted_config_takes_the_weights(family: str) -> None:
    model = _llama(2, family)
    ids = _ids(128)
    _prune_and_compact(model, ids)
    # Qwen2's config derives head_dim from the head count: it is pinned before that changes.
    assert model.config.head_dim == 16
    rebuilt = type(model)(type(model.config).from_dict(model.config.to_dict())).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["Mistral", "Qwen2"])
def test_mistral_and_qwen2_take_the_same_path(family: str) -> None:
    model = _llama(2, family)
    ids = _ids(128)
    pruner, logits, tokens = _prune_and_compact(model, ids)
    assert sorted(pruner.plan.groups) == [f"model.layers.{i}.{n}" for i in (0, 1)
                                          for n in ("mlp.gate_proj", "self_attn.q_proj")]
    _check_same(model, ids, logits, tokens)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)


def test_layers_that_end_up_different_keep_the_config_and_still_generate(
        caplog: pytest.LogCaptureFixture) -> None:
    model = _llama(kv_heads=2)
    ids = _ids(128)
    x = {"input_ids": ids}
    structure = discover(model, x)
    # One key/value group off in the first layer only.
    masks = structure.masks({"model.layers.0.self_attn.q_proj": torch.tensor([False, True])})
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            reference.get_parameter(name).mul_(mask)
        logits = reference(**x).logits
    tokens = _generate(reference, ids)
    with caplog.at_level(logging.WARNING):
        sc.compact_(model, x, masks=masks)
    assert [layer.self_attn.k_proj.out_features for layer in model.model.layers] == [16, 32]
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert "num_key_value_heads" in caplog.text
    _check_same(model, ids, logits, tokens)


def test_prune_channels_checks_and_compacts_a_llama() -> None:
    model = _llama(kv_heads=2)
    result = sc.prune_channels_(model, {"input_ids": _ids(128)}, 0.5)
    assert result.units["model.layers.1.self_attn.q_proj"] == (2, 1)
    assert result.units["model.layers.1.mlp.gate_proj"] == (128, 64)
    assert result.after.params < result.before.params


def test_an_attention_nobody_recognises_is_searched_within_a_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocks, "RECOGNISERS", {})
    model = _llama(kv_heads=2)
    start = time.perf_counter()
    groups = {g.name: g for g in discover(model, {"input_ids": _ids(128)}).groups}
    assert time.perf_counter() - start < 30
    stuck = groups["model.layers.0.self_attn.q_proj"]
    assert stuck.error is not None and "does not settle" in stuck.error
    assert groups["model.layers.0.mlp.up_proj"].prunable  # traced by Torch-Pruning


def test_phi3_fused_gate_up_neurons_go_in_pairs_and_its_attention_stays() -> None:
    torch.manual_seed(0)
    config = transformers.Phi3Config(hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128,
                                     max_position_embeddings=64, pad_token_id=0)
    model = transformers.Phi3ForCausalLM(config).eval()
    ids = _ids(128)
    start = time.perf_counter()
    pruner, logits, tokens = _prune_and_compact(model, ids)
    assert time.perf_counter() - start < 30
    assert sorted(pruner.plan.groups) == [f"model.layers.{i}.mlp.gate_up_proj" for i in (0, 1)]
    mlp = model.model.layers[0].mlp
    assert mlp.gate_up_proj.out_features == 128 and mlp.down_proj.in_features == 64
    assert model.model.layers[0].self_attn.qkv_proj.out_features == (4 + 2 * 2) * 16
    assert model.config.intermediate_size == 64
    _check_same(model, ids, logits, tokens)


# -- GPT-2 ------------------------------------------------------------------------------------

def test_gpt2_head_units_span_the_fused_q_k_v_slices() -> None:
    model = _gpt2()
    groups = {g.name: g for g in discover(model, {"input_ids": _ids(96)}).groups}
    attn = groups["transformer.h.0.attn.c_attn"]
    assert attn.prunable and attn.units == 4 and attn.channels == 64
    fused = next(s for s in attn.slices if s.param == "transformer.h.0.attn.c_attn.weight")
    assert fused.dim == 1 and fused.role == "out"  # Conv1D weights are (in, out)
    # A head is 16 positions in each of the q, k and v thirds of the output.
    assert torch.equal(attn.unit_of[fused.channel], torch.arange(192) % 64 // 16)
    reader = next(s for s in attn.slices if s.role == "in")
    assert (reader.param, reader.dim) == ("transformer.h.0.attn.c_proj.weight", 0)
    mlp = groups["transformer.h.0.mlp.c_fc"]
    assert mlp.prunable and mlp.units == 256
    stream = next(g for g in groups.values() if g.produces("transformer.wte.weight"))
    assert stream.fixed is not None and "LayerNorm" in stream.fixed


def test_gpt2_compacts_exactly_and_generates_what_the_masked_model_does() -> None:
    model = _gpt2()
    ids = _ids(96)
    pruner, logits, tokens = _prune_and_compact(model, ids)
    assert len(pruner.plan.groups) == 4
    _check_same(model, ids, logits, tokens)
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        assert (attn.num_heads, attn.head_dim, attn.split_size) == (2, 16, 32)
        assert attn.c_attn.weight.shape == (64, 96) and attn.c_attn.nf == 96
        assert attn.c_proj.weight.shape == (32, 64) and attn.c_proj.nx == 32
        assert attn.embed_dim == 64  # the residual width, which stays
        assert mlp.c_fc.weight.shape == (64, 128) and mlp.c_proj.weight.shape == (128, 64)
    # GPT-2's config derives head_dim from n_embd // n_head, so it cannot say 2 heads of
    # 16; its MLP width it can.
    assert model.config.n_head == 4 and model.config.n_inner == 128


# -- layers Torch-Pruning does not know -------------------------------------------------------

def test_conv1d_layers_outside_known_blocks_form_channel_groups() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(16, 8), nn.ReLU(), Conv1D(4, 16)).eval()
    x = torch.randn(3, 8)
    groups = {g.name: g for g in discover(model, x).groups}
    first = groups["0"]
    assert first.prunable and first.units == 16
    assert {(s.param, s.dim, s.role) for s in first.slices} == {
        ("0.weight", 1, "out"), ("0.bias", 0, "out"), ("2.weight", 0, "in")}
    assert groups["2"].fixed is not None
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel", example_inputs=x)
    pruner.update()
    with torch.no_grad():
        masked = model(x)
    sc.compact_(model, x, masks=pruner.masks)
    assert model[0].weight.shape == (8, 8) and model[0].nf == 8 and model[2].nx == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked, atol=ATOL, rtol=0)


def _handler_cases() -> list[tuple[str, object, nn.Module]]:
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2,
                                      num_key_value_heads=2, mlp_bias=True)
    return [("conv1d", TransposedLinearPruner(), Conv1D(6, 5)),
            ("rmsnorm", NormPruner(), LlamaRMSNorm(7)),
            ("block", BlockPruner(("gate_proj", "up_proj"), ("down_proj",)), LlamaMLP(config))]


@pytest.mark.parametrize("case", range(3), ids=["conv1d", "rmsnorm", "block"])
@pytest.mark.parametrize("out", [True, False], ids=["out", "in"])
def test_handler_slices_are_what_the_handler_removes(case: int, out: bool) -> None:
    _, handler, layer = _handler_cases()[case]
    positions = [0, 2, 3]
    cuts = handler.cuts(layer, out, torch.tensor(positions))
    predicted = {n: list(p.shape) for n, p in layer.named_parameters()}
    for cut in cuts:
        predicted[cut.param_name][cut.dim] -= len(positions)
    width = handler.get_out_channels(layer) if out else handler.get_in_channels(layer)
    (handler.prune_out_channels if out else handler.prune_in_channels)(layer, positions)
    assert {n: list(p.shape) for n, p in layer.named_parameters()} == predicted
    after = handler.get_out_channels(layer) if out else handler.get_in_channels(layer)
    assert after == width - len(positions)
