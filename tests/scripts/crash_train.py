"""Gradual pruning with a checkpoint every few steps; resumes from it when present.

Run by ``tests/test_crash_resume.py``, which kills it with SIGKILL at random steps and
checks that the final weights and masks equal those of an uninterrupted run bit for bit.
Randomness comes from the global generators (dropout, data), so a resume is exact only
if the checkpoint restores them too.

Usage: ``python tests/scripts/crash_train.py OUT_DIR [--steps N] [--every K] [--delay S]``.
Prints ``step N`` after each step; writes ``OUT_DIR/final.safetensors`` at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

import secateurs as sc
from secateurs import checkpoint
from secateurs.lr import ScheduledLR
from secateurs.schedules import Cosine, Cubic


def build() -> tuple[nn.Module, torch.optim.Optimizer, sc.Pruner, ScheduledLR]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 64),
                          nn.ReLU(), nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    pruner = sc.Pruner(model, Cubic(initial=0.0, final=0.8, begin_step=4, end_step=40),
                       scope="global", update_every=3, optimizer=optimizer)
    scheduler = ScheduledLR(optimizer, Cosine(1.0, 0.1, end_step=60))
    return model, optimizer, pruner, scheduler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, optimizer, pruner, scheduler = build()
    ckpt = args.out / "last.safetensors"
    states = {"lr": scheduler}
    if ckpt.exists():
        checkpoint.load(ckpt, model, pruner, optimizer, states=states)
    for step in range(pruner.step_count, args.steps):
        x = torch.randn(16, 32)
        y = torch.randint(0, 8, (16,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()
        scheduler.step()
        if (step + 1) % args.every == 0:
            checkpoint.save(ckpt, model, pruner, optimizer, states=states)
        print(f"step {step + 1}", flush=True)
        time.sleep(args.delay)
    final = {f"weights/{k}": v for k, v in model.state_dict().items()}
    final.update({f"masks/{k}": m for k, m in pruner.masks.items()})
    safetensors.torch.save_file(final, args.out / "final.safetensors")


if __name__ == "__main__":
    main()
