"""Save a checkpoint of a large model over and over to one path, until killed.

Used by ``benchmarks/faults.py`` to land SIGKILLs inside checkpoint writes: each save
prints ``saved N SHA256``; whatever the moment of the kill, the file at the path must be a
complete checkpoint (the previous or the new one), and the temporary file a killed write
leaves must be removed by the next save.

Usage: ``python tests/scripts/save_loop.py OUT_DIR [--params N]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import secateurs as sc
from secateurs import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--params", type=int, default=20_000_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    width = max(8, int((args.params / 4) ** 0.5))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = sc.Pruner(model, 0.5, optimizer=opt)
    pruner.step()
    for i in range(10**9):
        info = checkpoint.save(args.out / "last.safetensors", model, pruner, opt,
                               meta={"i": i})
        print(f"saved {i} {info.sha256}", flush=True)


if __name__ == "__main__":
    main()
