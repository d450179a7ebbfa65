"""The layer-wise pipeline of sequential one-shot pruning: same result as whole-model stages,
block calls linear in depth, on a small encoder and on BERT, GPT-2 and Llama (random init)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateurs.calibration import BlockPipeline, plan_blocks, repeated_blocks
from secateurs.oneshot import block_of, prune_
from secateurs.targets import resolve_targets
from test_oneshot import TinyEncoder, encoder_batches, in_layers

transformers = pytest.importorskip("transformers")


def tiny(family: str, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
              "hidden_size": 32, "intermediate_size": 64}
    if family == "bert":
        model = transformers.BertModel(transformers.BertConfig(**common))
    elif family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_layer=layers, n_head=4, n_embd=32, n_positions=32))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, num_key_value_heads=2, max_position_embeddings=32))
    return model.eval()


def text_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0  # padding: the attention mask must reach every block
        out.append({"input_ids": torch.randint(0, 64, (2, 9), generator=g),
                    "attention_mask": mask, "use_cache": False})
    return out


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_same(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    pa, pb = params(a), params(b)
    for k in pa:
        if atol:
            torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(pa[k], pb[k]), k


def test_blocks_are_found_from_the_structure():
    found = repeated_blocks(TinyEncoder())
    assert found is not None and found.container == "layers"
    assert found.names == ("layers.0", "layers.1", "layers.2")
    assert repeated_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) is None
    names = {f: repeated_blocks(tiny(f)).names for f in ("bert", "gpt2", "llama")}
    assert names == {"bert": ("encoder.layer.0", "encoder.layer.1"),
                     "gpt2": ("transformer.h.0", "transformer.h.1"),
                     "llama": ("model.layers.0", "model.layers.1")}


def test_pipeline_equals_whole_model_stages_bit_for_bit():
    torch.manual_seed(0)
    encoder = TinyEncoder().eval()
    staged = copy.deepcopy(encoder)
    calib = encoder_batches(3, 0)
    a = prune_(encoder, 0.5, "contribution", calib, targets=in_layers, reconstruct=True,
               sequential=True, progress=False)
    b = prune_(staged, 0.5, "contribution", calib, targets=in_layers, reconstruct=True,
               sequential=True, stages=block_of, progress=False)
    assert (a.mode, b.mode) == ("blocks", "stages")
    assert_same(encoder, staged)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert [r.relative_error for r in a.targets] == [r.relative_error for r in b.targets]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_pipeline_on_transformers_models(family):
    model = tiny(family, layers=3)
    staged = copy.deepcopy(model)
    calib = text_batches(3)
    blocks = repeated_blocks(model)
    assert blocks is not None
    targets = [t.name for t in resolve_targets(model)
               if t.module_name.startswith(blocks.container + ".")]
    calls = [0] * len(blocks.modules)
    for i, block in enumerate(blocks.modules):
        block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    report = prune_(model, 0.5, "contribution", calib, targets=targets, reconstruct=True,
                    sequential=True, progress=False)
    assert report.mode == "blocks" and report.notes == []
    assert calls == [1 + 2 * 3, 1 + 2 * 3, 1 + 3]  # probe, statistics, outputs
    prune_(staged, 0.5, "contribution", calib, targets=targets, reconstruct=True,
           sequential=True, stages=block_of, progress=False)
    # Same computation; a block called alone may take another kernel path than inside
    # the whole model (fused attention), hence a tolerance.
    assert_same(model, staged, atol=1e-5)
    assert report.sparsity() == 0.5


def test_targets_after_the_blocks_are_pruned_last_on_the_pruned_outputs():
    model = tiny("llama", layers=2)
    report = prune_(model, 0.5, "contribution", text_batches(2), sequential=True,
                    progress=False)
    stages = {r.name: r.stage for r in report.targets}
    assert report.mode == "blocks"
    assert stages["lm_head.weight"] == "head"
    assert stages["model.layers.1.mlp.down_proj.weight"] == "model.layers.1"


def test_block_calls_grow_linearly_with_depth():
    counts = {}
    for depth in (2, 4, 8):
        torch.manual_seed(0)
        encoder = TinyEncoder(depth=depth).eval()
        report = prune_(encoder, 0.5, "contribution", encoder_batches(2, 0),
                        targets=in_layers, sequential=True, progress=False)
        counts[depth] = report.block_calls
    assert counts == {2: 3 * 2, 4: 7 * 2, 8: 15 * 2}  # 2 per block and batch, the last 1


class Unchained(nn.Module):
    """Blocks that do not feed each other: the pipeline cannot replay them."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer(x) for layer in self.layers)


def test_models_the_pipeline_cannot_replay_fall_back_to_stages_and_say_why():
    model = Unchained()
    reason = plan_blocks(model, resolve_targets(model), [torch.randn(3, 4)])
    assert isinstance(reason, str) and "does not receive the output" in reason
    report = prune_(model, 0.5, "contribution", [torch.randn(3, 4)], sequential=True,
                    progress=False)
    assert report.mode == "stages" and "does not receive the output" in report.notes[0]


def test_capture_records_block_inputs_without_caches():
    model = tiny("gpt2", layers=2)
    targets = resolve_targets(model, r"transformer\.h\.")
    batches = [{**b, "use_cache": True} for b in text_batches(2)]
    plan = plan_blocks(model, targets, batches)
    assert not isinstance(plan, str)
    pipe = BlockPipeline(model, batches, plan, progress=False)
    pipe.capture()
    assert len(pipe.calls) == 2
    for call in pipe.calls:
        values = [*call.args, *call.kwargs.values()]
        assert not any(type(v).__name__.endswith("Cache") for v in values)
        assert call.kwargs.get("use_cache", False) is False


class StemAndHead(nn.Module):
    """A target before the blocks and one after them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU())
                                    for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_stem_and_head_targets_are_pruned_before_and_after_the_blocks():
    torch.manual_seed(0)
    model = StemAndHead()
    staged = copy.deepcopy(model)
    calib = [torch.randn(8, 6) for _ in range(3)]
    report = prune_(model, 0.5, "contribution", calib, reconstruct=True, sequential=True,
                    progress=False)
    assert report.mode == "blocks"
    assert [r.stage for r in report.targets] == ["stem", "layers.0", "layers.1", "layers.2",
                                                  "head"]
    prune_(staged, 0.5, "contribution", calib, reconstruct=True, sequential=True,
           stages=block_of, progress=False)
    assert_same(model, staged)
