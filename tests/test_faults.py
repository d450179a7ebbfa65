"""Faults around checkpoints and pruning: all-or-nothing loads, concurrent saves without
litter, disk errors, FSDP2 refused early, and only documented exceptions."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

import secateurs as sc
from conftest import train_steps
from secateurs import checkpoint
from secateurs.checkpoint import CheckpointError
from secateurs.checkpoint.digest import content_digest


def _trained(seed: int = 0, criterion: str = "contribution"
             ) -> tuple[nn.Module, sc.Pruner, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = sc.Pruner(model, 0.5, criterion, optimizer=opt)
    train_steps(model, opt, 2, pruner.step, seed=seed)
    return model, pruner, opt


def _state(model: nn.Module, pruner: sc.Pruner, opt: torch.optim.Optimizer) -> list[Any]:
    return [{k: v.clone() for k, v in model.state_dict().items()}, pruner.state_dict(),
            repr(opt.state_dict()), torch.get_rng_state()]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b)


def _rewrite(path: Path, change: Any) -> None:
    """Edit a checkpoint's header and tensors, and recompute its content hash."""
    with safetensors.safe_open(path, "pt") as f:
        header = json.loads(f.metadata()["secateurs"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(header["sections"], tensors)
    text = json.dumps(header)
    safetensors.torch.save_file(tensors, path, {"format": "pt", "secateurs": text,
                                                "sha256": content_digest(text, tensors)})


# -- all or nothing ----------------------------------------------------------------------

def test_a_bad_rng_state_is_refused_before_weights_and_optimizer_change(tmp_path: Path
                                                                        ) -> None:
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, *_trained())

    def bad_rng(sections: dict, tensors: dict) -> None:
        key = sections["rng"]["0"]["python"]["$tensor"]
        tensors[key] = tensors[key].clone()
        tensors[key][-1] = 10**6  # the Mersenne Twister's index, at most 624

    _rewrite(path, bad_rng)
    live = _trained(seed=1)
    before = _state(*live)
    with pytest.raises(CheckpointError, match="RNG state refused by its generator"):
        checkpoint.load(path, *live)
    assert _equal(_state(*live), before)


@pytest.mark.parametrize("what", ["exp_avg shape", "nan lr", "inf lr", "stats shape",
                                  "stats nan"])
def test_wrong_optimizer_or_criterion_state_is_refused_at_load(tmp_path: Path, what: str
                                                               ) -> None:
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, *_trained())

    def change(sections: dict, tensors: dict) -> None:
        opt = sections["optimizer"]["state"]
        stats = sections["pruner"]["criterion"]["values"]["0.weight"]["$tensor"]
        if what == "exp_avg shape":
            tensors[opt["state"]["$items"][1][1]["exp_avg"]["$tensor"]] = torch.zeros(3, 3)
        elif what.endswith("lr"):
            opt["param_groups"][0]["lr"] = {"$float": what.split()[0]}
        elif what == "stats shape":
            tensors[stats] = torch.ones(8, dtype=torch.float64)
        else:
            tensors[stats] = torch.full_like(tensors[stats], float("nan"))

    _rewrite(path, change)
    live = _trained(seed=1)
    before = _state(*live)
    with pytest.raises(CheckpointError, match="exp_avg|learning rate|statistics"):
        checkpoint.load(path, *live)
    assert _equal(_state(*live), before)


def test_pruner_load_state_dict_is_all_or_nothing() -> None:
    _, source, _ = _trained(seed=0)
    _, pruner, _ = _trained(seed=1)
    before = pruner.state_dict()
    state = source.state_dict()
    state["criterion"]["values"]["0.weight"] = torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'0\.weight' have shape \(5,\)"):
        pruner.load_state_dict(state)
    assert _equal(pruner.state_dict(), before)
    state = source.state_dict()
    state["step"] = True
    with pytest.raises(ValueError, match="'step' must be an integer"):
        pruner.load_state_dict(state)
    state = source.state_dict()
    state["masks"]["0.weight"] = state["masks"]["0.weight"].float()
    with pytest.raises(ValueError, match="must be torch.bool"):
        pruner.load_state_dict(state)
    assert _equal(pruner.state_dict(), before)
    pruner.load_state_dict(source.state_dict())
    assert _equal(pruner.state_dict(), source.state_dict())


def test_a_criterion_that_refuses_its_state_puts_the_pruner_back() -> None:
    _, pruner, _ = _trained(seed=1, criterion="random")
    before = pruner.state_dict()
    state = _trained(seed=0, criterion="random")[1].state_dict()
    state["criterion"] = {"unexpected": 1}
    state["masks"] = {k: ~v for k, v in state["masks"].items()}
    with pytest.raises((KeyError, ValueError)):  # the criterion's own refusal
        pruner.load_state_dict(state)
    assert _equal(pruner.state_dict(), before)


# -- concurrent saves, planted links, litter ---------------------------------------------

def test_two_threads_saving_to_one_path_both_succeed_and_leave_one_sound_file(
        tmp_path: Path) -> None:
    runs = [_trained(seed=s, criterion="magnitude") for s in (0, 1)]
    path = tmp_path / "c.safetensors"
    errors: list[BaseException] = []
    infos: list[str] = []

    def save(run: tuple) -> None:
        try:
            for _ in range(15):
                infos.append(checkpoint.save(path, *run).sha256)
        except BaseException as err:  # any error fails the test
            errors.append(err)

    threads = [threading.Thread(target=save, args=(run,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert checkpoint.read_info(path).sha256 in infos
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_link_planted_at_the_old_temporary_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = tmp_path / "c.safetensors"
    (tmp_path / f".{path.name}.{os.getpid()}.tmp").symlink_to(victim)
    checkpoint.save(path, *_trained(criterion="magnitude"))
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and checkpoint.read_info(path).sections[0] == "model"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_temporary_files_of_killed_saves_are_swept_live_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    killed = tmp_path / f".{path.name}.k1ll3d_x.tmp"
    killed.write_bytes(b"\0" * 4096)  # a save killed mid-write: nobody holds it
    old = tmp_path / f".{path.name}.4242.tmp"  # the name older versions used
    old.write_bytes(b"\0" * 4096)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    live = tmp_path / f".{path.name}.l1ve_abc.tmp"
    live.write_bytes(b"\0" * 4096)
    other = tmp_path / ".other.safetensors.k1ll3d_x.tmp"
    other.write_bytes(b"\0")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a save in progress in another process
        checkpoint.save(path, *_trained(criterion="magnitude"))
        assert live.exists()
    assert not killed.exists() and not old.exists()
    assert other.exists()  # another destination's files are that destination's business
    assert checkpoint.sweep_orphans(path) == 1  # the live one, now released


def test_a_reader_during_saves_never_sees_a_corrupted_file(tmp_path: Path) -> None:
    runs = [_trained(seed=s, criterion="magnitude") for s in (0, 1)]
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, *runs[0])
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        i = 0
        while not stop.is_set():
            checkpoint.save(path, *runs[i % 2])
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    loads = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline and loads < 200:
            try:
                checkpoint.read_info(path)
            except CheckpointError as err:
                errors.append(err)
            loads += 1
    finally:
        stop.set()
        writer.join()
    assert loads > 20 and not errors, errors[:3]


# -- disk full and I/O errors ------------------------------------------------------------

_FULL_DISK = """
import errno, resource, signal, sys, torch
from torch import nn
from secateurs import checkpoint
torch.manual_seed(0)
model = nn.Linear(256, 256)
checkpoint.save(sys.argv[1], nn.Linear(4, 4), rng=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    checkpoint.save(sys.argv[1], model)
except OSError as err:
    print("OSError", err.errno == errno.EFBIG)
except BaseException as err:
    print(type(err).__name__, err)
"""


def test_a_write_error_is_an_os_error_and_keeps_the_previous_checkpoint(tmp_path: Path
                                                                         ) -> None:
    path = tmp_path / "c.safetensors"
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.split() == ["OSError", "True"], proc.stdout + proc.stderr[-2000:]
    small = nn.Linear(4, 4)
    checkpoint.load(path, small, rng=False)  # the previous checkpoint, intact
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert errno.EFBIG


def test_an_unwritable_folder_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        checkpoint.save(tmp_path / "absent" / "c.safetensors", nn.Linear(2, 2))


# -- FSDP2 ---------------------------------------------------------------------------------

def test_fsdp2_sharded_parameters_are_refused_when_the_pruner_is_built(tmp_path: Path
                                                                       ) -> None:
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or dist.is_initialized():
        pytest.skip("needs fully_shard and no process group")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        fsdp.fully_shard(model)
        with pytest.raises(TypeError, match=r"DTensor shards .*FSDP2.*"
                                            r"secateurs\.distributed\.step.*prune the "
                                            "unsharded model first"):
            sc.Pruner(model, 0.5)
    finally:
        dist.destroy_process_group()


# -- only documented exceptions ------------------------------------------------------------

@pytest.mark.parametrize("masks", [[torch.ones(8, 1, 3, 3, dtype=torch.bool)],
                                   torch.ones(3, dtype=torch.bool), "features.0.weight"])
def test_compact_with_masks_of_the_wrong_type_is_a_type_error(cnn: nn.Module, masks: Any
                                                              ) -> None:
    with pytest.raises(TypeError, match="masks must be a mapping parameter name"):
        sc.compact_(cnn, torch.randn(1, 1, 8, 8), masks=masks)


def test_compact_argument_types_are_checked_first(cnn: nn.Module) -> None:
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        sc.compact_(cnn, torch.randn(1, 1, 8, 8), optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="atol"):
        sc.compact_(cnn, torch.randn(1, 1, 8, 8), atol=-1.0)


@pytest.mark.parametrize("granularity", ["element", "2:4"])
def test_bn_scale_without_channels_is_refused_when_the_pruner_is_built(
        cnn: nn.Module, granularity: str) -> None:
    with pytest.raises(ValueError, match="'bn_scale' scores whole channel groups.*"
                                         "granularity='channel' with example_inputs"):
        sc.Pruner(cnn, 0.5, "bn_scale", granularity=granularity)


def test_bn_scale_on_groups_without_batchnorm_is_refused_when_the_pruner_is_built(
        cnn: nn.Module) -> None:
    with pytest.raises(ValueError, match="needs a BatchNorm with a scale"):
        sc.Pruner(cnn, 0.5, "bn_scale", granularity="channel",
                  example_inputs=torch.randn(1, 1, 8, 8))
