"""Crafted checkpoint files, each loaded into a live model, pruner and optimizer.

Each case is a file an attacker or a broken disk could leave at the path: a header that
declares a huge mask in a few bytes (with a recomputed, valid content hash), byte counts
that do not match shapes, JSON nested a hundred thousand levels deep, a FIFO, a device,
fields missing or of the wrong type, states the generators or the optimizer would refuse
only later. For each, one JSON line on stdout: whether ``secateurs.checkpoint.load``
refused it with ``CheckpointError``, how long it took, the peak RSS growth while loading
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, Linux), and whether the
live objects were left unchanged.

Run by ``tests/test_hostile_files.py`` and ``benchmarks/faults.py``:
``python tests/scripts/hostile_files.py DIR [--repeat N]``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

import secateurs as sc
from secateurs import checkpoint
from secateurs.checkpoint import CheckpointError
from secateurs.checkpoint.digest import content_digest

LIMIT_S = 10  # a case that blocks longer is reported as such


class Blocked(BaseException):
    """Raised by the alarm in a load that blocks (no error type a loader would catch)."""


def live(seed: int = 0) -> tuple[nn.Module, sc.Pruner, torch.optim.Optimizer]:
    """A model, its pruner (``contribution``: statistics in its state) and Adam, after two
    steps; other seeds give other weights, masks and statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = sc.Pruner(model, 0.5, "contribution", optimizer=opt)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
        opt.step()
        pruner.step()
    return model, pruner, opt


def fingerprint(model: nn.Module, pruner: sc.Pruner, opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    tensors = {**{f"m/{k}": v for k, v in model.state_dict().items()},
               **{f"k/{k}": v for k, v in pruner.masks.items()}}
    for i, s in opt.state_dict()["state"].items():
        tensors.update({f"o/{i}/{k}": v for k, v in s.items()})
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    h.update(repr([g["lr"] for g in opt.param_groups]).encode())
    h.update(str(pruner.step_count).encode())
    h.update(torch.get_rng_state().numpy().data)
    return h.hexdigest()


def write(path: Path, header: dict[str, Any] | str, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint with ``header`` (or its JSON text) and ``tensors`` and a valid content
    hash (anyone can recompute it: it proves the file is intact, not that it is honest)."""
    text = header if isinstance(header, str) else json.dumps(header)
    meta = {"format": "pt", "secateurs": text, "sha256": content_digest(text, tensors)}
    safetensors.torch.save_file(tensors, path, meta)
    return path


def raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def cases(base: Path, tmp: Path) -> dict[str, Callable[[], Path]]:
    """Case name -> a function writing the crafted file and returning its path."""
    with safetensors.safe_open(base, "pt") as f:
        header = json.loads(f.metadata()["secateurs"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def edited(name: str, change: Callable[[dict[str, Any], dict[str, torch.Tensor]], Any]
               ) -> Callable[[], Path]:
        def make() -> Path:
            h, t = copy.deepcopy(header), dict(tensors)
            change(h, t)
            return write(tmp / f"{name}.safetensors", h, t)
        return make

    mask = "0.weight"

    def huge_mask(h: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        h["sections"]["pruner"]["masks"][mask]["shape"] = [8192, 8192]  # 64 Mi elements

    def huge_declared(h: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        h["sections"]["pruner"]["masks"][mask]["shape"] = [2**31, 2**31]

    def deep_state(h: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        node: Any = 0
        for _ in range(900):  # parses; nested past what a state tree needs
            node = [node]
        h["sections"]["pruner"]["applied"] = node

    def bits_dtype(h: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        key = h["sections"]["pruner"]["masks"][mask]["$bits"]
        t[key] = torch.zeros(t[key].numel() // 4 or 1, dtype=torch.float32)

    def rng_size(h: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        key = h["sections"]["rng"]["0"]["torch"]["$tensor"]
        t[key] = t[key][:100].clone()

    def rng_value(h: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        key = h["sections"]["rng"]["0"]["python"]["$tensor"]
        bad = t[key].clone()
        bad[-1] = 10**6  # the Mersenne Twister index, at most 624
        t[key] = bad

    def optimizer_shape(h: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        state = h["sections"]["optimizer"]["state"]["state"]["$items"][0][1]
        t[state["exp_avg"]["$tensor"]] = torch.zeros(7)

    def nan_lr(h: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        h["sections"]["optimizer"]["state"]["param_groups"][0]["lr"] = {"$float": "nan"}

    def stats_shape(h: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        key = h["sections"]["pruner"]["criterion"]["values"][mask]["$tensor"]
        t[key] = torch.ones(3, dtype=t[key].dtype)

    def stats_inf(h: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        key = h["sections"]["pruner"]["criterion"]["values"][mask]["$tensor"]
        bad = t[key].clone()
        bad[0] = float("inf")
        t[key] = bad

    def fifo() -> Path:
        path = tmp / "fifo.safetensors"
        os.mkfifo(path)
        return path

    def device() -> Path:
        path = tmp / "zero.safetensors"
        path.symlink_to("/dev/zero")
        return path

    def folder() -> Path:
        path = tmp / "folder.safetensors"
        path.mkdir()
        return path

    def huge_length() -> Path:
        path = tmp / "length.safetensors"
        path.write_bytes((2**63).to_bytes(8, "little") + b"{}")
        return path

    def huge_step() -> Path:
        h = copy.deepcopy(header)
        h["sections"]["pruner"]["step"] = 0
        text = json.dumps(h).replace('"step": 0', '"step": ' + "9" * 5000)
        return write(tmp / "huge_step.safetensors", text, dict(tensors))

    deep = '{"a":' * 100_000 + "1" + "}" * 100_000
    return {
        "mask shape far beyond its bytes": edited("huge_mask", huge_mask),
        "mask of 2^62 elements declared": edited("huge_declared", huge_declared),
        "tensor byte range beyond its shape": lambda: raw(
            tmp / "range.safetensors",
            b'{"t":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,8]}}', b"\0" * 8),
        "header length of 2^63 bytes": huge_length,
        "safetensors header nested 100,000 deep": lambda: raw(tmp / "deep1.safetensors",
                                                              deep.encode()),
        "checkpoint header nested 100,000 deep": lambda: write(tmp / "deep2.safetensors",
                                                               deep, {}),
        "state nested 900 deep": edited("deep_state", deep_state),
        "FIFO at the path": fifo,
        "device at the path": device,
        "directory at the path": folder,
        "no sections": edited("no_sections", lambda h, t: h.pop("sections")),
        "no model section": edited("no_model", lambda h, t: h["sections"].pop("model")),
        "no versions": edited("no_versions", lambda h, t: h.pop("versions")),
        "sections of the wrong type": edited("sections_type",
                                             lambda h, t: h.update(sections=[1, 2])),
        "header that is a list": lambda: write(tmp / "list.safetensors", "[1, 2]", {}),
        "reference to a missing tensor": edited(
            "dangling", lambda h, t: h["sections"]["model"].update(
                {"0.weight": {"$tensor": "nowhere"}})),
        "weight that is a number": edited(
            "number", lambda h, t: h["sections"]["model"].update({"0.weight": 3})),
        "packed mask of another dtype": edited("bits_dtype", bits_dtype),
        "step of 5,000 digits": huge_step,
        "RNG state of the wrong size": edited("rng_size", rng_size),
        "RNG state its generator refuses": edited("rng_value", rng_value),
        "optimizer state of the wrong shape": edited("optimizer_shape", optimizer_shape),
        "NaN learning rate": edited("nan_lr", nan_lr),
        "criterion statistics of the wrong shape": edited("stats_shape", stats_shape),
        "criterion statistics holding Inf": edited("stats_inf", stats_inf),
        "dict keys that are lists": edited(
            "items", lambda h, t: h["sections"]["pruner"].update(
                applied={"$items": [[[1, 2], 3]]})),
    }


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def measure(path: Path) -> dict[str, Any]:
    model, pruner, opt = objects = live(seed=1)  # not what the file holds
    before = fingerprint(*objects)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS starts again from the current RSS
        measured = True
    except OSError:
        measured = False
    rss = _status("VmRSS")

    def expire(signum: int, frame: Any) -> None:
        raise Blocked(f"no answer after {LIMIT_S} s")

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(LIMIT_S)
    start = time.perf_counter()
    try:
        checkpoint.load(path, model, pruner, opt)
        outcome, message = "loaded", ""
    except CheckpointError as err:
        outcome, message = "refused", str(err)
    except BaseException as err:  # what escaped is the finding
        outcome, message = type(err).__name__, str(err)[:300]
    finally:
        signal.alarm(0)
    seconds = time.perf_counter() - start
    return {"outcome": outcome, "message": message[:300], "seconds": seconds,
            "rss_growth_mb": max(0, _status("VmHWM") - rss) / 1024 if measured else None,
            "unchanged": fingerprint(*objects) == before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    model, pruner, opt = live()
    base = args.out / "base.safetensors"
    checkpoint.save(base, model, pruner, opt)
    made = {name: make() for name, make in cases(base, args.out).items()}
    for name, path in made.items():
        rows = [measure(path) for _ in range(args.repeat)]
        growth = [r["rss_growth_mb"] for r in rows if r["rss_growth_mb"] is not None]
        row = {**rows[-1], "seconds": max(r["seconds"] for r in rows),
               "rss_growth_mb": max(growth) if growth else None}
        print(json.dumps({"case": name, **row}), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
