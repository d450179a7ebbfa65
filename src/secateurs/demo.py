"""The demo: one small CNN trained densely, with gradual pruning, and with weight clipping.

Every run trains :class:`~secateurs.tasks.digits.DigitsCNN` on scikit-learn's digits from
the same seed (same initial weights, same batches, same optimizer and learning rate
schedule), so the runs differ only in what their step callbacks do:

- ``dense``: nothing but the learning rate schedule (warm-up, then cosine decay);
- ``pruned``: dynamic pruning, global magnitude ranking with the cubic schedule of Zhu &
  Gupta (2017) from 0 to 90% sparsity, masks updated every few steps;
- ``clipping``: dynamic weight clipping (splicing, Guo et al. 2016): weights below a
  rising threshold are zeroed at every mask update and may come back above
  ``threshold * (1 + margin)``; plus classic max-norm clipping of each output row.

Then, on copies of the trained dense model, one-shot runs without fine-tuning: magnitude
against contribution pruning (with and without reconstruction) at the same sparsity, and
structured pruning of half the channels, physically compacted, with its MACs and measured
latency.

A run is a :class:`RunSpec`: a name and a function building its callbacks from a
:class:`RunContext`, so a further run is one more entry in :data:`RUNS`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import validation as check
from .clipping import clip_
from .criteria import Clipping
from .lr import ScheduledLR
from .pruner import Pruner
from .report import Column, RunRecord, write_report
from .schedules import Cosine, Cubic, Linear, Warmup
from .targets import resolve_targets
from .tasks import ClassificationTask, get_task
from .train import StepCallback, steps_per_epoch, train

__all__ = ["COLUMNS", "RUNS", "DemoConfig", "DemoResult", "MaskWatch", "RunContext",
           "RunSetup", "RunSpec", "run_demo"]

#: Epochs of ``secateurs demo --quick``.
QUICK_EPOCHS = 15


@dataclass(frozen=True)
class DemoConfig:
    """Settings shared by every run of the demo.

    Attributes:
        epochs: Epochs of every run.
        seed: Seed of the data split, the initial weights and the batch order.
        batch_size: Examples per step.
        lr: Peak learning rate of SGD with Nesterov momentum.
        momentum: Momentum of SGD.
        warmup: Share of the steps spent warming the learning rate up from 0.
        final_sparsity: Sparsity the ``pruned`` run reaches, in ``[0, 1)``.
        prune_span: Shares of the run where pruning (and the clipping threshold) ramps.
        update_every: Steps between mask updates.
        clip_threshold: Final threshold of the ``clipping`` run (``|w|`` below is zeroed).
        clip_margin: Relative gap of the regrowth threshold above the pruning one.
        max_norm: Largest L2 norm of an output row in the ``clipping`` run.
        progress: Show progress bars.
    """

    epochs: int = 40
    seed: int = 0
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    warmup: float = 0.05
    final_sparsity: float = 0.9
    prune_span: tuple[float, float] = (0.1, 0.6)
    update_every: int = 10
    clip_threshold: float = 0.1
    clip_margin: float = 0.1
    max_norm: float = 1.5
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "update_every"):
            check.integer(name, getattr(self, name), low=1)
        check.integer("seed", self.seed)
        check.number("lr", self.lr, low=0.0, low_open=True)
        check.number("max_norm", self.max_norm, low=0.0, low_open=True)
        for name in ("momentum", "warmup"):
            check.number(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
        check.sparsity("final_sparsity", self.final_sparsity)
        for name in ("clip_threshold", "clip_margin"):
            check.number(name, getattr(self, name), low=0.0)
        check.boolean("progress", self.progress)
        span = check.instance("prune_span", self.prune_span, (tuple, list), "a pair (begin, end)")
        ends = [check.number(f"prune_span[{i}]", v, low=0.0, high=1.0) for i, v in enumerate(span)]
        if len(ends) != 2 or ends[0] >= ends[1]:
            raise ValueError(f"prune_span must be (begin, end) with 0 <= begin < end <= 1, got "
                             f"{self.prune_span!r}")


@dataclass
class RunContext:
    """What a run's callbacks are built from: a fresh model and its optimizer."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: DemoConfig
    total_steps: int

    def at(self, share: float) -> int:
        """The step at ``share`` of the run, rounded down to a mask update step."""
        every = self.config.update_every
        return int(share * self.total_steps) // every * every


@dataclass
class RunSetup:
    """A run's step callbacks, in call order, and what the report says about it."""

    callbacks: list[StepCallback]
    settings: dict[str, Any]
    pruner: Pruner | None = None
    watch: MaskWatch | None = None


@dataclass(frozen=True)
class RunSpec:
    """A named run: ``build`` turns a :class:`RunContext` into a :class:`RunSetup`."""

    name: str
    description: str
    build: Callable[[RunContext], RunSetup]


class MaskWatch:
    """Step callback that steps a pruner and counts what its mask updates change.

    At each update, ``pruned`` counts masks going ``True -> False`` and ``regrown``
    ``False -> True`` (a weight coming back). It records ``sparsity`` and ``regrown``
    (cumulative) at every step.
    """

    def __init__(self, pruner: Pruner) -> None:
        self.pruner = pruner
        self.previous = pruner.masks.state_dict()
        self.pruned = 0
        self.regrown = 0
        self.updates = 0

    def __call__(self, step: int) -> dict[str, float]:
        if self.pruner.step():
            self.updates += 1
            for name, mask in self.pruner.masks.items():
                before = self.previous[name]
                self.pruned += int((before & ~mask).sum())
                self.regrown += int((mask & ~before).sum())
            self.previous = self.pruner.masks.state_dict()
        return {"sparsity": self.pruner.sparsity(), "regrown": float(self.regrown)}


def _lr(ctx: RunContext) -> tuple[StepCallback, dict[str, Any]]:
    """Linear warm-up then cosine decay to 0 (Goyal et al. 2017; Loshchilov & Hutter 2017)."""
    warmup = max(1, round(ctx.config.warmup * ctx.total_steps))
    schedule = Warmup(Cosine(1.0, 0.0, end_step=max(1, ctx.total_steps - warmup)), warmup)
    scheduler = ScheduledLR(ctx.optimizer, schedule)

    def step(_: int) -> None:
        scheduler.step()

    return step, {"lr_factor": repr(schedule)}


def _dense(ctx: RunContext) -> RunSetup:
    lr_step, settings = _lr(ctx)
    return RunSetup([lr_step], settings)


def _span(ctx: RunContext) -> tuple[int, int]:
    """First and last step of the pruning ramp (``prune_span`` of the run)."""
    begin, end = (ctx.at(share) for share in ctx.config.prune_span)
    return begin, max(end, begin + ctx.config.update_every)  # very short runs still ramp


def _pruned(ctx: RunContext) -> RunSetup:
    cfg = ctx.config
    sparsity = Cubic(0.0, cfg.final_sparsity, *_span(ctx), frequency=cfg.update_every)
    pruner = Pruner(ctx.model, sparsity, "magnitude", scope="global",
                    update_every=cfg.update_every, optimizer=ctx.optimizer)
    watch = MaskWatch(pruner)
    lr_step, settings = _lr(ctx)
    settings |= {"sparsity": repr(sparsity), "criterion": "magnitude", "scope": "global",
                 "update_every": cfg.update_every}
    return RunSetup([watch, lr_step], settings, pruner, watch)


def _clipping(ctx: RunContext) -> RunSetup:
    cfg = ctx.config
    begin, end = _span(ctx)
    threshold = Linear(0.0, cfg.clip_threshold, begin_step=begin, end_step=end)
    criterion = Clipping(threshold=threshold, margin=cfg.clip_margin)
    pruner = Pruner(ctx.model, None, criterion, update_every=cfg.update_every,
                    optimizer=ctx.optimizer)
    watch = MaskWatch(pruner)

    def max_norm(_: int) -> None:
        clip_(ctx.model, max_norm=cfg.max_norm)

    lr_step, settings = _lr(ctx)
    settings |= {"criterion": repr(criterion), "update_every": cfg.update_every,
                 "max_norm": cfg.max_norm}
    # Max-norm first: rows it shrinks are then judged against the threshold at their new size.
    return RunSetup([max_norm, watch, lr_step], settings, pruner, watch)


#: The demo's runs, in table order.
RUNS: tuple[RunSpec, ...] = (
    RunSpec("dense", "Dense training: learning rate warm-up then cosine decay.", _dense),
    RunSpec("pruned", "Gradual magnitude pruning, global ranking, cubic schedule from 0 to the "
            "final sparsity (Zhu & Gupta 2017); pruned weights and their momentum stay zero.",
            _pruned),
    RunSpec("clipping", "Dynamic weight clipping: |w| below a linearly rising threshold is "
            "zeroed at each mask update, and comes back at or above threshold x (1 + margin) "
            "(Guo et al. 2016); plus max-norm clipping of each output row.", _clipping),
)


def _cell_percent(key: str) -> Callable[[RunRecord], str]:
    return lambda r: f"{r.metrics[key]:.1%}"


#: Columns of the demo's table.
COLUMNS: tuple[Column, ...] = (
    Column("run", lambda r: r.name),
    Column("test accuracy", _cell_percent("test_accuracy")),
    Column("sparsity", _cell_percent("sparsity")),
    Column("non-zero parameters", lambda r: f"{int(r.metrics['nonzero']):,} / "
                                            f"{int(r.metrics['parameters']):,}"),
    Column("regrown", lambda r: f"{int(r.metrics['regrown']):,}" if "regrown" in r.metrics
           else "-"),
    Column("MACs", lambda r: f"{int(r.metrics['macs']):,}" if "macs" in r.metrics else "-"),
    Column("latency x dense (batch 64)",
           lambda r: f"{r.metrics['speedup']:.2f}x" if "speedup" in r.metrics else "-"),
    Column("time (s)", lambda r: f"{r.metrics['seconds']:.1f}"),
)


@dataclass
class DemoResult:
    """The demo's records, in :data:`RUNS` order, and its report folder."""

    records: list[RunRecord]
    report_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the demo's table."""
        return [c.header for c in COLUMNS], [[c.cell(r) for c in COLUMNS] for r in self.records]


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def _final_metrics(model: nn.Module) -> dict[str, float]:
    """Sparsity of the default targets (their share of exact zeros) and non-zero counts."""
    weights = [t.param for t in resolve_targets(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    params = list(model.parameters())
    return {"sparsity": zeros / sum(w.numel() for w in weights),
            "nonzero": float(sum(int(torch.count_nonzero(p)) for p in params)),
            "parameters": float(sum(p.numel() for p in params))}


def _execute(spec: RunSpec, task: ClassificationTask,
             config: DemoConfig) -> tuple[RunRecord, nn.Module]:
    model = task.model(config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=True)
    total = config.epochs * steps_per_epoch(len(task.data.train), config.batch_size)
    setup = spec.build(RunContext(model, optimizer, config, total))
    history = train(model, optimizer, task.data, epochs=config.epochs,
                    batch_size=config.batch_size, seed=config.seed,
                    callbacks=setup.callbacks, progress=config.progress, desc=spec.name)
    metrics = {"test_accuracy": history.last("test_accuracy"),
               "val_accuracy": history.last("val_accuracy"),
               **_final_metrics(model), "seconds": history.seconds}
    if setup.watch is not None:
        metrics |= {"regrown": float(setup.watch.regrown), "pruned": float(setup.watch.pruned),
                    "mask_updates": float(setup.watch.updates)}
    layers = {} if setup.pruner is None else \
        {row.name: row.sparsity for row in setup.pruner.summary()}
    record = RunRecord(spec.name, spec.description, metrics, setup.settings, history.steps,
                       history.epochs, layers)
    return record, model


def _command(config: DemoConfig, quick: bool) -> str:
    parts = ["secateurs demo"]
    if quick:
        parts.append("--quick")
    if config.epochs != (QUICK_EPOCHS if quick else DemoConfig.epochs):
        parts.append(f"--epochs {config.epochs}")
    if config.seed != DemoConfig.seed:
        parts.append(f"--seed {config.seed}")
    return " ".join(parts)


def run_demo(
    config: DemoConfig,
    out: str | Path = "runs",
    *,
    runs: Sequence[RunSpec] = RUNS,
    quick: bool = False,
) -> DemoResult:
    """Train every run of ``runs`` on the digits task and write the report under ``out``.

    Args:
        config: Shared settings.
        out: Base folder of the report (a timestamped folder is created inside).
        runs: The runs, in table order.
        quick: Whether ``config`` is the quick one (only changes the reproducing command).

    Returns:
        The records and the report folder.
    """
    task = get_task("digits", seed=config.seed)
    # The CNN is far too small to gain from intra-op threads, and on shared cores their
    # synchronisation makes each step many times slower.
    with _threads(1):
        trained = [_execute(spec, task, config) for spec in runs]
        records = [record for record, _ in trained]
        dense = next(((r, m) for r, m in trained if r.name == "dense"), None)
        if dense is not None:
            records += _after_training(*dense, task, config)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    settings |= {"task": "digits", "optimizer": "SGD, Nesterov momentum",
                 "train/val/test examples": [len(task.data.train), len(task.data.val),
                                             len(task.data.test)]}
    folder = write_report(out, records, COLUMNS, title="secateurs demo",
                          command=_command(config, quick), settings=settings, notes=[_NOTE])
    return DemoResult(records, folder, settings)


#: Sparsity of the one-shot runs on the trained dense model.
ONESHOT_SPARSITY = 0.85
#: Channel sparsity of the structured run.
CHANNEL_SPARSITY = 0.5


def _after_training(dense_record: RunRecord, dense: nn.Module, task: ClassificationTask,
                    config: DemoConfig) -> list[RunRecord]:
    """One-shot runs on copies of the trained dense model: unstructured (magnitude against
    contribution, with and without reconstruction) and structured (channels removed)."""
    from .oneshot import prune_
    from .structured import compact_, count, latency

    train_x = task.data.train.x
    calibration = list(train_x[:256].split(64))
    oneshot = (("one-shot magnitude", "magnitude", False),
               ("one-shot contribution", "contribution", False),
               ("one-shot contribution + reconstruction", "contribution", True))
    records = []
    for name, criterion, reconstruct in oneshot:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        prune_(model, ONESHOT_SPARSITY, criterion, calibration=calibration, scope="layer",
               reconstruct=reconstruct, progress=False)
        records.append(_oneshot_record(name, model, task, time.perf_counter() - start,
                                       {"criterion": criterion, "reconstruct": reconstruct,
                                        "sparsity": ONESHOT_SPARSITY,
                                        "calibration examples": 256}))
    model = copy.deepcopy(dense)
    example = train_x[:1]
    start = time.perf_counter()
    pruner = Pruner(model, CHANNEL_SPARSITY, "l1", granularity="channel", example_inputs=example)
    pruner.step()
    compact_(model, example, masks=pruner.masks)
    seconds = time.perf_counter() - start
    timing = latency([dense, model], train_x[:64], rounds=5)
    record = _oneshot_record("structured 50% channels (compacted)", model, task, seconds,
                             {"criterion": "l1", "granularity": "channel",
                              "channel sparsity": CHANNEL_SPARSITY})
    record.metrics |= {"macs": float(count(model, example).macs),
                       "speedup": timing[1].speedup}
    records.append(record)
    dense_record.metrics |= {"macs": float(count(dense, example).macs), "speedup": 1.0}
    return records


def _oneshot_record(name: str, model: nn.Module, task: ClassificationTask, seconds: float,
                    settings: dict[str, Any]) -> RunRecord:
    metrics = {"test_accuracy": task.evaluate(model, "test")["accuracy"],
               "val_accuracy": task.evaluate(model, "val")["accuracy"],
               **_final_metrics(model), "seconds": seconds}
    description = "One shot on the trained dense model, no fine-tuning: " + \
        ", ".join(f"{k} {v}" for k, v in settings.items()) + "."
    return RunRecord(name, description, metrics, settings)


_NOTE = (
    "Every run starts from the same initial weights and sees the same batches; only the "
    "step callbacks differ. Sparsity is the share of exact zeros in the weights of the "
    "convolutions and linear layers. *regrown* counts weights whose mask went from pruned "
    "back to kept at a mask update: zero by design for gradual pruning (masks are nested); "
    "for clipping, a pruned weight keeps training behind its mask (its updates are "
    "accumulated while it reads as zero) and returns once that value crosses the regrowth "
    "threshold. The one-shot "
    "rows prune copies of the trained dense model without any fine-tuning; their time is "
    "the pruning time, calibration included. Latency is the median forward time at batch "
    "64 relative to the dense model, measured in the same run."
)
