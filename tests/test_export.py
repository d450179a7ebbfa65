"""Export: pruned safetensors with masks folded in and rebuilt from zeros, carrying a content
hash checked on loading; ONNX with an onnxruntime parity check."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import secateurs as sc
from conftest import train_steps
from secateurs.checkpoint import CheckpointError
from secateurs.export import (
    UnverifiedFileWarning,
    load_pruned,
    masks_from_zeros,
    pruner_from_zeros,
    save_pruned,
)
from secateurs.schedules import Linear


def _pruned(mlp: nn.Module) -> tuple[sc.Pruner, torch.optim.Optimizer]:
    opt = torch.optim.SGD(mlp.parameters(), lr=0.05, momentum=0.9)
    pruner = sc.Pruner(mlp, 0.6, optimizer=opt)
    train_steps(mlp, opt, 3, pruner.step)
    return pruner, opt


def _fresh() -> nn.Module:
    torch.manual_seed(42)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def test_masks_folded_in_and_rebuilt_from_zeros(tmp_path: Path, mlp: nn.Module) -> None:
    pruner, _ = _pruned(mlp)
    path = save_pruned(tmp_path / "sparse.safetensors", mlp, pruner.masks)
    plain = safetensors.torch.load_file(path)  # any reader: a dense state_dict with zeros
    assert sorted(plain) == sorted(mlp.state_dict())
    for name, mask in pruner.masks.items():
        assert not plain[name][~mask].any()
    model = _fresh()
    masks = load_pruned(path, model)
    assert sorted(masks) == sorted(pruner.masks)
    assert all(torch.equal(masks[n], pruner.masks[n]) for n in masks)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 mlp.state_dict().values(), strict=True))


def test_explicit_masks_are_folded_into_the_file_not_the_model(tmp_path: Path,
                                                               mlp: nn.Module) -> None:
    mask = torch.rand(32, 16, generator=torch.Generator().manual_seed(0)) > 0.3
    before = mlp[0].weight.clone()
    save_pruned(tmp_path / "m.safetensors", mlp, {"0.weight": mask})
    assert torch.equal(mlp[0].weight, before)
    written = safetensors.torch.load_file(tmp_path / "m.safetensors")["0.weight"]
    assert torch.equal(written, torch.where(mask, before, 0.0))
    model = _fresh()
    assert torch.equal(load_pruned(tmp_path / "m.safetensors", model)["0.weight"], mask)


def test_a_sparse_file_from_elsewhere_continues_under_a_pruner(tmp_path: Path,
                                                               mlp: nn.Module) -> None:
    pruner, _ = _pruned(mlp)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(dict(mlp.state_dict()), foreign)  # no secateurs header
    model = _fresh()
    with pytest.warns(UnverifiedFileWarning, match="foreign.safetensors.*cannot be verified"):
        masks = load_pruned(foreign, model)
    assert all(torch.equal(masks[n], pruner.masks[n]) for n in pruner.masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cont = pruner_from_zeros(model, Linear(0.6, 0.8, end_step=6), optimizer=opt)
    assert cont.sparsity() == pytest.approx(0.6, abs=0.01)
    train_steps(model, opt, 8, cont.step, seed=3)
    assert cont.sparsity() == pytest.approx(0.8, abs=0.01)
    for name, adopted in masks.items():
        assert not (cont.masks[name] & ~adopted).any(), "a pruned weight came back"
        assert not dict(model.named_parameters())[name][~cont.masks[name]].any()


def test_adopting_masks_that_do_not_fit_changes_nothing(mlp: nn.Module) -> None:
    pruner = sc.Pruner(mlp, 0.5)
    before = [p.clone() for p in mlp.parameters()]
    with pytest.raises(ValueError, match=r"'nope'.*not targets of the pruner; targets: "):
        pruner.adopt_masks_({"nope": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'0\.weight' must be torch.bool of shape \(32, 16\)"):
        pruner.adopt_masks_({"0.weight": torch.ones(16, 32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must be torch.bool.*got torch.float32"):
        pruner.adopt_masks_({"0.weight": torch.ones(32, 16)})
    assert all(m.all() for m in pruner.masks.values())
    assert all(torch.equal(a, b) for a, b in zip(before, mlp.parameters(), strict=True))


def test_the_adopt_masks_function_warns_and_forwards_to_the_method(mlp: nn.Module) -> None:
    from secateurs.export import adopt_masks_

    pruner = sc.Pruner(mlp, 0.5)
    mask = torch.rand(32, 16, generator=torch.Generator().manual_seed(0)) > 0.3
    with pytest.warns(DeprecationWarning, match=r"secateurs\.Pruner\.adopt_masks_"):
        adopt_masks_(pruner, {"0.weight": mask})
    assert torch.equal(pruner.masks["0.weight"], mask)
    assert not mlp[0].weight[~mask].any()


def test_loading_a_file_that_does_not_fit_changes_nothing(tmp_path: Path, mlp: nn.Module
                                                          ) -> None:
    path = save_pruned(tmp_path / "m.safetensors", mlp)
    other = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(CheckpointError, match=r"0\.weight: \(32, 16\).*\(8, 16\)"):
        load_pruned(path, other)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pruned(path, _fresh())
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))


def test_tied_weights_are_written_once_and_restored(tmp_path: Path) -> None:
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    path = save_pruned(tmp_path / "t.safetensors", nn.Sequential(emb, head), targets=["0.weight"])
    assert list(safetensors.torch.load_file(path)) == ["0.weight"]
    fresh = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    masks = load_pruned(path, fresh)
    assert list(masks) == ["0.weight"] and torch.equal(fresh[1].weight, emb.weight)


def test_masks_from_zeros(mlp: nn.Module) -> None:
    with torch.no_grad():
        mlp[2].weight[:5] = 0
    masks = masks_from_zeros(mlp)
    assert list(masks) == ["0.weight", "2.weight", "4.weight"]
    assert int((~masks["2.weight"]).sum()) == 5 * 32


# -- integrity --------------------------------------------------------------------------------

def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _loads_quietly(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_pruned(path, _fresh())


def test_an_untouched_file_verifies_and_loads_without_a_warning(tmp_path: Path,
                                                               mlp: nn.Module) -> None:
    pruner, _ = _pruned(mlp)
    path = save_pruned(tmp_path / "m.safetensors", mlp, pruner.masks)
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert len(metadata["sha256"]) == 64
    assert json.loads(metadata["secateurs.export"])["format_version"] == 2
    masks = _loads_quietly(path)
    assert all(torch.equal(masks[n], pruner.masks[n]) for n in pruner.masks)


def test_a_flipped_byte_in_a_tensor_is_refused_naming_the_file(tmp_path: Path,
                                                               mlp: nn.Module) -> None:
    path = save_pruned(tmp_path / "m.safetensors", mlp)
    _flip(path, _data_start(path) + 1001)
    model = _fresh()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*corrupted: content hash"):
        load_pruned(path, model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("field", [b"sparsity", b"targets", b"format_version"])
def test_a_flipped_byte_in_the_metadata_is_refused(tmp_path: Path, mlp: nn.Module,
                                                   field: bytes) -> None:
    path = save_pruned(tmp_path / "m.safetensors", mlp, metadata={"note": "kept"})
    _flip(path, path.read_bytes().index(field))  # still valid JSON: only the hash notices
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*corrupted"):
        load_pruned(path, _fresh())


def test_one_flipped_bit_in_any_byte_of_the_file_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_pruned(tmp_path / "tiny.safetensors", nn.Sequential(nn.Linear(4, 3)),
                       metadata={"note": "kept"})
    original = path.read_bytes()
    for offset in range(len(original)):  # the length prefix, the header, every tensor byte
        for bit in (0x01, 0x80):
            data = bytearray(original)
            data[offset] ^= bit
            path.write_bytes(bytes(data))
            with pytest.raises(CheckpointError, match="tiny.safetensors"):
                load_pruned(path, nn.Sequential(nn.Linear(4, 3)))


def test_a_file_from_before_hashes_loads_with_a_warning(tmp_path: Path, mlp: nn.Module) -> None:
    pruner, _ = _pruned(mlp)
    old = tmp_path / "old.safetensors"
    header = {"targets": list(pruner.masks), "aliases": {}, "sparsity": {}}
    safetensors.torch.save_file(dict(mlp.state_dict()), old,
                                {"format": "pt", "secateurs.export": json.dumps(header)})
    with pytest.warns(UnverifiedFileWarning, match="old.safetensors.*no content hash"):
        masks = load_pruned(old, _fresh())
    assert all(torch.equal(masks[n], pruner.masks[n]) for n in pruner.masks)


def test_a_file_whose_hash_was_removed_is_refused(tmp_path: Path, mlp: nn.Module) -> None:
    path = save_pruned(tmp_path / "m.safetensors", mlp)
    with safetensors.safe_open(path, "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "sha256"}
    safetensors.torch.save_file(safetensors.torch.load_file(path), path, metadata)
    with pytest.raises(CheckpointError, match="lost its content hash"):
        load_pruned(path, _fresh())


def test_metadata_may_not_override_the_entries_the_file_reserves(tmp_path: Path,
                                                                 mlp: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"metadata must not set \['sha256'\]"):
        save_pruned(tmp_path / "m.safetensors", mlp, metadata={"sha256": "0" * 64})
    assert not (tmp_path / "m.safetensors").exists()


# -- ONNX -------------------------------------------------------------------------------------

class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture
def compacted() -> tuple[nn.Module, torch.Tensor, int]:
    from secateurs import structured
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(4, 1, 8, 8)
    params = sum(p.numel() for p in model.parameters())
    pruner = sc.Pruner(model, 0.5, "l1", granularity="channel",
                       targets=["features.0", "features.3", "head.1"], example_inputs=x)
    pruner.step()
    structured.compact_(model, x, masks=pruner.masks)
    return model, x, params


@pytest.mark.slow
def test_compacted_model_to_onnx_matches_onnxruntime(tmp_path: Path,
                                                     compacted: tuple) -> None:
    pytest.importorskip("onnxruntime")
    from secateurs.export import export_onnx

    model, x, dense_params = compacted
    assert sum(p.numel() for p in model.parameters()) < dense_params
    result = export_onnx(model, x, tmp_path / "small.onnx")
    assert result.path.exists() and result.max_abs_diff is not None
    assert result.max_abs_diff < 1e-4
    import onnx
    graph = onnx.load(str(result.path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch


@pytest.mark.slow
def test_parity_check_catches_a_model_that_changed(tmp_path: Path, compacted: tuple) -> None:
    pytest.importorskip("onnxruntime")
    from secateurs.export import ParityError, check_onnx, export_onnx

    model, x, _ = compacted
    export_onnx(model, x, tmp_path / "m.onnx", dynamic_batch=False, check=False)
    assert check_onnx(tmp_path / "m.onnx", model, x) < 1e-4
    with torch.no_grad():
        model.head[-1].bias.add_(0.1)
    with pytest.raises(ParityError, match="differs from PyTorch by up to 0.1"):
        check_onnx(tmp_path / "m.onnx", model, x)


def test_onnx_export_refuses_bad_inputs_before_exporting(tmp_path: Path, mlp: nn.Module
                                                         ) -> None:
    from secateurs.export import export_onnx

    with pytest.raises(ValueError, match=r"batch of 2 or more.*\[\(1, 16\)\]"):
        export_onnx(mlp, torch.randn(1, 16), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="example_inputs must be a tensor.*got str"):
        export_onnx(mlp, "x", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
