"""A plain training loop for classifiers on in-memory tensors.

Minibatch training with any torch optimizer, deterministic given a seed, with optional
callbacks that run right after ``optimizer.step()``: that is where ``Pruner.step()``,
``ScheduledLR.step()`` and ``clip_`` go. The loop itself knows nothing of pruning, so it
serves dense training as well; what a callback returns is recorded in the step history.

Example:
    >>> def prune(step):
    ...     pruner.step()
    ...     return {"sparsity": pruner.sparsity()}
    >>> history = train(model, opt, splits, epochs=10,
    ...                 callbacks=[prune, lambda step: scheduler.step()])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import validation as check

__all__ = [
    "EpochCallback",
    "History",
    "Split",
    "Splits",
    "StepCallback",
    "evaluate",
    "run_epoch",
    "steps_per_epoch",
    "train",
]

#: Called with the global step (0-based) right after ``optimizer.step()``; what it returns
#: is added to that step's record.
StepCallback = Callable[[int], Mapping[str, float] | None]
#: Called with the epoch (0-based) and its record (``train_loss``, ``val_accuracy``, ...).
EpochCallback = Callable[[int, Mapping[str, float]], None]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Split:
    """Inputs and integer class labels of one split, first dimension aligned.

    Raises:
        ValueError: if ``x`` and ``y`` differ in length, or the split is empty.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y) or len(self.y) == 0:
            raise ValueError(f"a split needs as many inputs as labels, at least one; got "
                             f"{len(self.x)} inputs and {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    """The train, validation and test splits of a data set."""

    train: Split
    val: Split
    test: Split


@dataclass
class History:
    """What a training run recorded.

    Attributes:
        steps: Per optimizer step: ``loss``, ``lr`` (of the first param group, the one
            used for that step) and every key a step callback returned; each list has one
            entry per step, ``nan`` where a key was not reported.
        epochs: Per epoch: ``epoch`` (1-based), ``train_loss`` (mean over the epoch),
            ``val_accuracy``, ``test_accuracy``.
        seconds: Wall time of the whole loop, evaluations included.
    """

    steps: dict[str, list[float]] = field(default_factory=dict)
    epochs: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def record_step(self, values: Mapping[str, float]) -> None:
        """Append one step; keys seen for the first time are back-filled with ``nan``."""
        done = len(next(iter(self.steps.values()), []))
        for key in values.keys() - self.steps.keys():
            self.steps[key] = [math.nan] * done
        for key, column in self.steps.items():
            column.append(float(values.get(key, math.nan)))

    def record_epoch(self, values: Mapping[str, float]) -> None:
        """Append one epoch record (same keys every epoch)."""
        for key, value in values.items():
            self.epochs.setdefault(key, []).append(float(value))

    def last(self, key: str) -> float:
        """The last per-epoch value of ``key`` (e.g. ``test_accuracy``)."""
        return self.epochs[key][-1]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: ``ceil(num_examples / batch_size)`` (last batch kept)."""
    return math.ceil(check.integer("num_examples", num_examples, low=1)
                     / check.integer("batch_size", batch_size, low=1))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``split``, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in zip(split.x.split(batch_size), split.y.split(batch_size), strict=True):
        correct += int((model(x).argmax(dim=1) == y).sum())
    model.train(was_training)
    return correct / len(split)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                x: torch.Tensor, y: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {float(loss)}; lower the learning rate")
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    *,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    callbacks: Sequence[StepCallback] = (),
    loss_fn: LossFn = F.cross_entropy,
    first_step: int = 0,
    history: History | None = None,
    bar: tqdm | None = None,
) -> list[float]:
    """One pass over ``split`` by minibatches in a random order; returns the step losses.

    The model is put in training mode. Step callbacks run in order right after each
    ``optimizer.step()`` with the global step (``first_step`` for the first batch).

    Args:
        model: The classifier.
        optimizer: Any torch optimizer over the model's parameters.
        split: The training examples.
        batch_size: Examples per step, ``>= 1``; the last batch may be smaller.
        generator: Draws the batch order (a fresh unseeded one when ``None``).
        callbacks: Step callbacks (pruning, LR schedules, clipping).
        loss_fn: ``loss_fn(logits, labels) -> scalar``.
        first_step: Global step of the first batch.
        history: Where each step's record is appended, if given.
        bar: Progress bar advanced once per step, if given.
    """
    order = torch.randperm(len(split), generator=generator).split(
        check.integer("batch_size", batch_size, low=1))
    losses: list[float] = []
    model.train()
    for idx in order:
        losses.append(_train_step(model, optimizer, loss_fn, split.x[idx], split.y[idx]))
        record = {"loss": losses[-1], "lr": float(optimizer.param_groups[0]["lr"])}
        for callback in callbacks:
            record.update(callback(first_step + len(losses) - 1) or {})
        if history is not None:
            history.record_step(record)
        if bar is not None:
            bar.update()
    return losses


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Splits,
    *,
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    callbacks: Sequence[StepCallback] = (),
    epoch_callbacks: Sequence[EpochCallback] = (),
    loss_fn: LossFn = F.cross_entropy,
    progress: bool = True,
    desc: str = "train",
) -> History:
    """Train ``model`` on ``data.train`` by minibatches; evaluate after every epoch.

    Batches are drawn by a generator seeded with ``seed``, so two calls with the same
    seed, model initialisation and optimizer see the same batches and give the same
    weights. Step callbacks run in order right after each ``optimizer.step()``.

    Args:
        model: The classifier; ``model(x)`` returns logits ``(batch, classes)``.
        optimizer: Any torch optimizer over the model's parameters.
        data: Train, validation and test splits.
        epochs: Passes over the training split, ``>= 1``.
        batch_size: Examples per step, ``>= 1``; the last batch of an epoch may be smaller.
        seed: Seed of the batch order.
        callbacks: Step callbacks (pruning, LR schedules, clipping).
        epoch_callbacks: Called after each epoch's evaluation (metric-driven control).
        loss_fn: ``loss_fn(logits, labels) -> scalar``.
        progress: Show a progress bar (cleared when done).
        desc: Label of the progress bar.

    Returns:
        The :class:`History` of steps and epochs.

    Raises:
        ArgumentTypeError: if ``epochs`` or ``batch_size`` is not an integer.
        ValueError: if ``epochs`` or ``batch_size`` is below 1.
        FloatingPointError: if the loss becomes NaN or Inf.
    """
    epochs = check.integer("epochs", epochs, low=1)
    check.instance("data", data, Splits, "a Splits of train, val and test")
    per_epoch = steps_per_epoch(len(data.train), batch_size)
    generator = torch.Generator().manual_seed(seed)
    history = History()
    bar = tqdm(total=epochs * per_epoch, desc=desc, leave=False, disable=not progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    for epoch in range(epochs):
        losses = run_epoch(model, optimizer, data.train, batch_size=batch_size,
                           generator=generator, callbacks=callbacks, loss_fn=loss_fn,
                           first_step=epoch * per_epoch, history=history, bar=bar)
        summary = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses),
                   "val_accuracy": evaluate(model, data.val),
                   "test_accuracy": evaluate(model, data.test)}
        history.record_epoch(summary)
        bar.set_postfix(loss=f"{summary['train_loss']:.3f}", val=f"{summary['val_accuracy']:.3f}")
        for epoch_callback in epoch_callbacks:
            epoch_callback(epoch, summary)
    bar.close()
    history.seconds = time.perf_counter() - start
    return history
