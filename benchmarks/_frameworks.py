"""Step overhead of ``secateurs`` inside training frameworks and under ``torch.compile``: a
section of ``step_overhead.py`` (not a benchmark of its own, hence the underscore).

Each framework trains a dense copy and a pruned copy (masks computed at the first step,
then a steady state) of the same seeded MLP on the same batches, in rounds
whose order alternates; steps are timed by a callback of the framework (the Trainer's
``on_step_begin`` to ``on_step_end``, Lightning's ``on_train_batch_start`` to
``on_train_batch_end``, after the pruning callback), so the pruning callback's work is in
the pruned step. Ratios are medians of per-round ratios of median steps.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secateurs import Pruner

Times = list[tuple[float, float]]  # (wall s, CPU s) per timed step


class _Clock:
    """Per-step wall and CPU time between a start and a stop call."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.times: Times = []
        self._start = (0.0, 0.0)

    def start(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        if self.skip > 0:
            self.skip -= 1
            return
        self.times.append((time.perf_counter() - self._start[0],
                           time.process_time() - self._start[1]))


def _hf(build: Callable[[], nn.Module], shape: tuple[int, ...], batch: int, steps: int,
        warmup: int, sparsity: float | None) -> Times:
    import transformers

    from secateurs.integrations.hf import PruningCallback

    class WithLoss(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": F.cross_entropy(self.net(x), labels)}

    clock = _Clock(warmup)

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            clock.start()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.stop()

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(*shape, generator=g), "labels": int(i % 10)}
            for i in range(batch * (steps + warmup))]
    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir="/tmp/secateurs-bench-hf", max_steps=steps + warmup,
        per_device_train_batch_size=batch, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, logging_steps=50, dataloader_num_workers=0)
    callbacks: list[Any] = [] if sparsity is None else [PruningCallback(sparsity)]
    trainer = transformers.Trainer(WithLoss(build()), args, train_dataset=data,
                                   callbacks=[*callbacks, Timer()])
    trainer.train()
    return clock.times


def _lightning(build: Callable[[], nn.Module], shape: tuple[int, ...], batch: int,
               steps: int, warmup: int, sparsity: float | None) -> Times:
    import lightning.pytorch as pl

    from secateurs.integrations.lightning import PruningCallback

    class Module(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, b: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(b[0]), b[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    clock = _Clock(warmup)

    class Timer(pl.Callback):
        def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
            clock.start()

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            clock.stop()

    g = torch.Generator().manual_seed(0)
    n = batch * (steps + warmup)
    data = torch.utils.data.TensorDataset(torch.randn(n, *shape, generator=g),
                                          torch.randint(0, 10, (n,), generator=g))
    torch.manual_seed(0)
    callbacks: list[Any] = [] if sparsity is None else [PruningCallback(sparsity)]
    trainer = pl.Trainer(max_steps=steps + warmup, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[*callbacks, Timer()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(build()), torch.utils.data.DataLoader(data, batch_size=batch))
    return clock.times


def _compiled(build: Callable[[], nn.Module], shape: tuple[int, ...], batch: int, steps: int,
              warmup: int, rounds: int, sparsity: float) -> Pairs:
    """Dense and pruned copies, both ``torch.compile``d (inductor), stepped in turns."""
    torch.manual_seed(0)
    base = build()
    models = {name: build() for name in ("dense", "pruned")}
    runs = {}
    for name, model in models.items():
        model.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        pruner = Pruner(model, sparsity, optimizer=opt) if name == "pruned" else None
        runs[name] = (torch.compile(model), opt, pruner)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def step(name: str) -> tuple[float, float]:
        forward, opt, pruner = runs[name]
        start, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        if pruner is not None:
            pruner.step()
        return time.perf_counter() - start, time.process_time() - cpu

    for _ in range(warmup):  # compiles (once per model) and the first mask update
        for name in runs:
            step(name)
    out = []
    for r in range(rounds):
        order = ["dense", "pruned"] if r % 2 == 0 else ["pruned", "dense"]
        times: dict[str, Times] = {"dense": [], "pruned": []}
        for _ in range(steps):
            for name in order:
                times[name].append(step(name))
        out.append((times["dense"], times["pruned"]))
    return out


Pairs = list[tuple[Times, Times]]  # per round: the dense and the pruned step times


def measure(build: Callable[[], nn.Module], shape: tuple[int, ...], batch: int, *,
            sparsity: float = 0.9, rounds: int = 4, steps: int = 20, warmup: int = 3
            ) -> dict[str, Pairs]:
    """Per setting: per round, the dense and the pruned step times."""
    out: dict[str, Pairs] = {}
    for name, fn in [("Hugging Face Trainer (fused AdamW)", _hf),
                     ("Lightning (SGD, momentum 0.9)", _lightning)]:
        try:
            pairs = []
            for r in range(rounds):
                order = [False, True] if r % 2 == 0 else [True, False]
                got = {p: fn(build, shape, batch, steps, warmup, sparsity if p else None)
                       for p in order}
                pairs.append((got[False], got[True]))
            out[name] = pairs
        except ImportError as err:  # the framework is not installed
            print(f"skipping {name}: {err}")
    out["torch.compile, inductor (SGD, momentum 0.9)"] = _compiled(
        build, shape, batch, steps, warmup, rounds, sparsity)
    return out


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def table(res: dict[str, Pairs]) -> str:
    """One row per setting: dense and pruned median steps, wall and CPU, and the ratios."""
    rows = ["| setting | dense step (ms) | pruned step (ms) | x dense | dense CPU (ms) | "
            "pruned CPU (ms) | x dense |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, pairs in res.items():
        cells = []
        for k in (0, 1):  # wall, CPU
            dense = [_med([t[k] for t in d]) for d, _ in pairs]
            pruned = [_med([t[k] for t in p]) for _, p in pairs]
            ratio = _med([p / d for d, p in zip(dense, pruned, strict=True)])
            cells += [f"{_med(dense) * 1e3:.2f}", f"{_med(pruned) * 1e3:.2f}", f"{ratio:.3f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
