"""Checkpoints: exact resume, bit-packed masks, atomic writes, no unpickling, and refusals
that change nothing."""

from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import secateurs as sc
from conftest import train_steps
from secateurs import checkpoint
from secateurs.checkpoint import CheckpointError
from secateurs.checkpoint.codec import Encoder, decode, encode
from secateurs.controllers import Plateau
from secateurs.lr import ScheduledLR
from secateurs.schedules import Cosine, Cubic


def _run(seed: int = 0, hidden: int = 32, criterion: str = "random"
         ) -> tuple[nn.Module, sc.Pruner, torch.optim.Optimizer, dict[str, Any]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(hidden, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = sc.Pruner(model, Cubic(initial=0.0, final=0.7, begin_step=0, end_step=12),
                       criterion, update_every=2, optimizer=opt)
    states = {"lr": ScheduledLR(opt, Cosine(1.0, 0.1, end_step=30)),
              "plateau": Plateau(opt, patience=1)}
    return model, pruner, opt, states


def _steps(model: nn.Module, pruner: sc.Pruner, opt: torch.optim.Optimizer,
           states: dict[str, Any], n: int) -> None:
    for _ in range(n):
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))  # global RNG, as dropout
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        pruner.step()
        states["lr"].step()
        states["plateau"].observe(float(loss.detach()))


def _snapshot(model: nn.Module, pruner: sc.Pruner, opt: torch.optim.Optimizer) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "masks": {k: v.clone() for k, v in pruner.masks.items()},
            "step": pruner.step_count,
            "opt": {i: {k: v.clone() for k, v in s.items()}
                    for i, s in opt.state_dict()["state"].items()}}


def _same(a: dict, b: dict) -> bool:
    def eq(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return x.dtype == y.dtype and x.shape == y.shape and torch.equal(
                x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return bool(x == y)
    return eq(a, b)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, tuple]:
    run = _run()
    _steps(*run, 5)
    path = tmp_path / "run.safetensors"
    checkpoint.save(path, *run[:3], states=run[3], meta={"epoch": 2})
    return path, run


@pytest.mark.parametrize("criterion", ["random", "contribution"])
def test_resume_from_file_equals_uninterrupted_run(tmp_path: Path, criterion: str) -> None:
    # random: the criterion's generator; contribution: its moving-average statistics.
    run = _run(criterion=criterion)
    _steps(*run, 5)
    path = tmp_path / "run.safetensors"
    checkpoint.save(path, *run[:3], states=run[3])
    _steps(*run, 9)
    expected = _snapshot(*run[:3])
    fresh = _run(seed=123, criterion=criterion)
    checkpoint.load(path, *fresh[:3], states=fresh[3])
    _steps(*fresh, 9)
    assert _same(_snapshot(*fresh[:3]), expected)
    assert _same(fresh[1].criterion.state_dict(), run[1].criterion.state_dict())


def test_masks_are_bit_packed_and_header_is_json(saved: tuple[Path, tuple]) -> None:
    path, run = saved
    pruner = run[1]
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
        packed = {k: f.get_tensor(k) for k in f.keys() if k.startswith("pruner/masks/")}  # noqa: SIM118
    assert len(packed) == len(pruner.masks)
    for name, mask in pruner.masks.items():
        bits = packed[f"pruner/masks/{name}"]
        assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(mask.numel() / 8)
    header = json.loads(meta["secateurs"])
    assert header["versions"]["torch"] == torch.__version__
    assert header["meta"] == {"epoch": 2}
    assert len(meta["sha256"]) == 64
    info = checkpoint.read_info(path)
    assert info.meta == {"epoch": 2} and info.sha256 == meta["sha256"]
    assert set(info.sections) == {"model", "pruner", "optimizer", "states", "rng"}


def test_loading_never_unpickles(saved: tuple[Path, tuple], monkeypatch: pytest.MonkeyPatch
                                 ) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling was attempted")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    path, _ = saved
    fresh = _run(seed=5)
    checkpoint.load(path, *fresh[:3], states=fresh[3])
    assert fresh[1].step_count == 5


def test_rng_states_are_restored(saved: tuple[Path, tuple]) -> None:
    path, _ = saved
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(77)
    np.random.seed(77)
    random.seed(77)
    checkpoint.load(path, *_run(seed=9)[:3])
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_crash_mid_write_keeps_previous_checkpoint(saved: tuple[Path, tuple],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, run = saved
    before = path.read_bytes()

    def partial_write(f: Any, tensors: dict, metadata: dict) -> None:
        f.write(b"\x00" * 100)
        raise KeyboardInterrupt  # the process dies half way

    monkeypatch.setattr(checkpoint.container, "write_tensors", partial_write)
    _steps(*run, 2)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, *run[:3])
    assert path.read_bytes() == before
    assert checkpoint.read_info(path).meta == {"epoch": 2}
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def _assert_refused(path: Path, run: tuple, match: str, **kwargs: Any) -> None:
    model, pruner, opt, states = run
    before = _snapshot(model, pruner, opt)
    lr_before = states["lr"].state_dict()
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(path, model, pruner, opt, states=states, **kwargs)
    assert _same(_snapshot(model, pruner, opt), before)
    assert states["lr"].state_dict() == lr_before


def test_truncated_file_is_refused(saved: tuple[Path, tuple]) -> None:
    path, _ = saved
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        _assert_refused(path, _run(seed=3), "truncated")


def test_hash_mismatch_is_refused(saved: tuple[Path, tuple]) -> None:
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data
    path.write_bytes(bytes(data))
    _assert_refused(path, _run(seed=3), "corrupted: content hash")


def test_model_with_other_shapes_or_names_is_refused(saved: tuple[Path, tuple]) -> None:
    path, _ = saved
    _assert_refused(path, _run(hidden=48), r"0\.weight: \(32, 16\).*\(48, 16\)")
    renamed = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(CheckpointError, match=r"missing \['2\.weight'.*unexpected \['3\.weight'"):
        checkpoint.load(path, renamed)


def test_pruner_or_optimizer_that_do_not_fit_are_refused(saved: tuple[Path, tuple]) -> None:
    path, _ = saved
    model = _run(seed=3)[0]
    other = sc.Pruner(model, 0.5, targets=["0.weight"])
    with pytest.raises(CheckpointError, match=r"pruner targets differ.*missing \[\].*3\.weight"):
        checkpoint.load(path, model, other)
    few = torch.optim.Adam(list(model.parameters())[:2])
    run = _run(seed=3)
    before = _snapshot(*run[:3])
    with pytest.raises(CheckpointError, match="optimizer's parameters differ: 4 saved, 2 live"):
        checkpoint.load(path, run[0], run[1], few)
    assert _same(_snapshot(*run[:3]), before)


def test_a_failing_later_part_undoes_the_earlier_ones(saved: tuple[Path, tuple]) -> None:
    path, _ = saved
    model, pruner, opt, states = _run(seed=3)
    _steps(model, pruner, opt, states, 3)
    masks = {k: v.clone() for k, v in pruner.masks.items()}

    class Broken:
        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        checkpoint.load(path, model, pruner, states={"lr": states["lr"], "plateau": Broken()})
    assert pruner.step_count == 3
    assert all(torch.equal(masks[k], pruner.masks[k]) for k in masks)


def test_missing_sections_and_foreign_files_are_refused(tmp_path: Path,
                                                        saved: tuple[Path, tuple]) -> None:
    path, run = saved
    bare = tmp_path / "bare.safetensors"
    checkpoint.save(bare, run[0], rng=False)
    with pytest.raises(CheckpointError, match="holds no pruner, rng state"):
        checkpoint.load(bare, run[0], run[1])
    checkpoint.load(bare, run[0], rng=False)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a secateurs checkpoint"):
        checkpoint.load(foreign, run[0])
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpoint.load(tmp_path / "absent.safetensors", run[0])
    with pytest.raises(CheckpointError, match="RNG states for ranks \\['0'\\], not for rank 3"):
        checkpoint.load(path, run[0], rank=3)


def test_unsavable_state_is_refused_before_writing(tmp_path: Path, mlp: nn.Module) -> None:
    class Odd:
        def state_dict(self) -> dict:
            return {"fn": print}

    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="states/odd/fn: cannot save a value of type"):
        checkpoint.save(path, mlp, states={"odd": Odd()})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="meta must be JSON-serialisable"):
        checkpoint.save(path, mlp, meta={"x": float("nan")})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        checkpoint.save(path, "model")  # type: ignore[arg-type]
    assert not path.exists()


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    path = tmp_path / "tied.safetensors"
    checkpoint.save(path, model, rng=False)
    with safetensors.safe_open(path, "pt") as f:
        assert len([k for k in f.keys() if k.startswith("model/")]) == 1  # noqa: SIM118
    other = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    checkpoint.load(path, other, rng=False)
    assert torch.equal(other[0].weight, emb.weight) and torch.equal(other[1].weight, emb.weight)


def test_train_steps_fixture_model_round_trips(tmp_path: Path, cnn: nn.Module) -> None:
    opt = torch.optim.SGD(cnn.parameters(), lr=0.1, momentum=0.9)
    pruner = sc.Pruner(cnn, 0.5, optimizer=opt)
    train_steps(cnn, opt, 2, pruner.step, in_shape=(1, 8, 8), classes=10)
    checkpoint.save(tmp_path / "c.safetensors", cnn, pruner, opt)
    torch.manual_seed(1)
    from conftest import SmallCNN
    other = SmallCNN()
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    other_pruner = sc.Pruner(other, 0.5, optimizer=other_opt)
    checkpoint.load(tmp_path / "c.safetensors", other, other_pruner, other_opt)
    assert _same(_snapshot(other, other_pruner, other_opt), _snapshot(cnn, pruner, opt))


_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=5),
    st.floats(allow_nan=False), st.sampled_from([math.inf, -math.inf]),
    st.builds(lambda shape, seed: torch.rand(shape, generator=torch.Generator().manual_seed(
        seed)) > 0.5, st.lists(st.integers(0, 9), max_size=3), st.integers(0, 99)),
    st.builds(lambda n: torch.arange(n, dtype=torch.float64), st.integers(0, 20)),
)
_tree = st.recursive(_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.tuples(kids, kids),
    st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 5)), kids, max_size=3)),
    max_leaves=12)


@given(_tree)
def test_any_nested_state_round_trips(tree: Any) -> None:
    enc = Encoder()
    node = json.loads(json.dumps(encode(tree, "x", enc), allow_nan=False))
    data = safetensors.torch.load(safetensors.torch.save(enc.tensors))
    back = decode(node, data)

    def eq(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(eq, a, b))
        if isinstance(a, dict):
            return list(a) == list(b) and all(eq(a[k], b[k]) for k in a)
        return type(a) is type(b) and a == b

    assert eq(tree, back)
