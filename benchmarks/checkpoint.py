"""Checkpoint cost: ``secateurs.checkpoint`` against ``torch.save`` of the same state.

The state is what a pruning run needs to resume: model weights, Adam's moments, the
pruner's masks and step, and the RNG states. Both writers get the same durability:
``torch.save`` is followed by ``fsync``; ``secateurs.checkpoint.save`` writes a temporary
file, fsyncs it, renames it over the destination and hashes the content (SHA-256).
Loading means restoring live objects: ``torch.load(weights_only=True)`` then each
``load_state_dict``, against ``secateurs.checkpoint.load`` (which also checks the size,
the hash, the names and the shapes before changing anything). Files are read back from
the page cache in both cases. The variants alternate in rounds; figures are medians.

Usage: ``python benchmarks/checkpoint.py [--quick] [--results-dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

import secateurs as sc
from secateurs import checkpoint
from secateurs.checkpoint.digest import content_digest

THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results"


def build(width: int, depth: int) -> tuple[nn.Module, sc.Pruner, torch.optim.Optimizer]:
    """An MLP pruned to 80% (global magnitude) after a few Adam steps."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = sc.Pruner(model, 0.8, scope="global", optimizer=opt)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(32, 784)),
                                    torch.randint(0, 10, (32,))).backward()
        opt.step()
        pruner.step()
    return model, pruner, opt


def torch_state(model: nn.Module, pruner: sc.Pruner, opt: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "pruner": pruner.state_dict(), "rng": torch.get_rng_state()}


def torch_save(path: Path, state: dict) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def torch_load(path: Path, model: nn.Module, pruner: sc.Pruner,
               opt: torch.optim.Optimizer) -> None:
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    pruner.load_state_dict(state["pruner"])
    torch.set_rng_state(state["rng"])


def rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, the functions alternating in rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up: allocator, page cache, imports
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass
class Row:
    name: str
    params: int
    mask_elems: int
    save: dict[str, float]
    load: dict[str, float]
    size: dict[str, int]
    hash_s: float


def measure(name: str, width: int, depth: int, repeats: int, tmp: Path) -> Row:
    model, pruner, opt = build(width, depth)
    state = torch_state(model, pruner, opt)
    pt, st = tmp / f"{name}.pt", tmp / f"{name}.safetensors"
    save = rounds({"torch": lambda: torch_save(pt, state),
                   "secateurs": lambda: checkpoint.save(st, model, pruner, opt)}, repeats)
    load = rounds({"torch": lambda: torch_load(pt, model, pruner, opt),
                   "secateurs": lambda: checkpoint.load(st, model, pruner, opt)}, repeats)
    tensors = safetensors.torch.load_file(st)
    hashing = rounds({"sha256": lambda: content_digest("", tensors)}, repeats)["sha256"]
    return Row(name, sum(p.numel() for p in model.parameters()),
               sum(m.numel() for m in pruner.masks.values()), save, load,
               {"torch": pt.stat().st_size, "secateurs": st.stat().st_size}, hashing)


def table(rows: list[Row]) -> str:
    head = ["model (params)", "save: torch.save", "save: secateurs", "ratio",
            "load: torch.load", "load: secateurs", "ratio", "size: torch.save",
            "size: secateurs", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s, lo, z = r.save, r.load, r.size
        cells = [f"{r.name} ({r.params:,})",
                 f"{s['torch'] * 1e3:.0f} ms", f"{s['secateurs'] * 1e3:.0f} ms",
                 f"{s['secateurs'] / s['torch']:.2f}x",
                 f"{lo['torch'] * 1e3:.0f} ms", f"{lo['secateurs'] * 1e3:.0f} ms",
                 f"{lo['secateurs'] / lo['torch']:.2f}x",
                 f"{z['torch'] / 2**20:.1f} MiB", f"{z['secateurs'] / 2**20:.1f} MiB",
                 f"{z['secateurs'] / z['torch']:.3f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, few rounds")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores")
    configs = [("MLP 784-256x2-10", 256, 2)] if args.quick else \
        [("MLP 784-1024x4-10", 1024, 4), ("MLP 784-2048x6-10", 2048, 6)]
    repeats = 3 if args.quick else 7
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, w, d, repeats, Path(tmp)) for name, w, d in configs]
    text = table(rows)
    print(text)
    notes = "\n".join(
        f"- {r.name}: the SHA-256 of the content takes {r.hash_s * 1e3:.0f} ms of each save "
        f"and of each load; the masks ({r.mask_elems:,} elements) take "
        f"{-(-r.mask_elems // 8):,} bytes bit-packed, {r.mask_elems:,} as torch.bool in "
        "torch.save" for r in rows)
    flags = (" --quick" if args.quick else "") + \
        (f" --threads {args.threads}" if args.threads != THREADS else "")
    section = (
        "## Checkpoints: secateurs.checkpoint against torch.save\n\n"
        f"Command: `python benchmarks/checkpoint.py{flags}`. Machine: {os.cpu_count()} cores, "
        f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads, load "
        f"average {load:.1f} when it started (the machine is shared). State: model "
        "weights, Adam moments, pruner masks (80% global magnitude) and step, RNG. Both "
        "writers fsync; secateurs also writes atomically (temporary file + rename) and hashes "
        "the content; its load reads the file through one descriptor into memory (no mmap), "
        "checks every declared shape against the live objects before reading a tensor, then "
        "the hash and the values (finite learning rates, RNG states) before restoring. "
        "Medians of alternating rounds; ratios are secateurs / torch in the same run.\n\n"
        f"{text}\n\n{notes}\n")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "checkpoint.md").write_text(section)


if __name__ == "__main__":
    main()
