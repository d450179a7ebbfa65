"""Counting what a model costs: parameters, multiply-accumulates and bytes on disk."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..graph.groups import forward

__all__ = ["Counts", "Latency", "count", "latency"]


@dataclass(frozen=True)
class Counts:
    """What one model costs on one input.

    Attributes:
        params: Parameters (tied parameters once).
        nonzero: Parameters that are not exactly zero (what masking alone reduces).
        macs: Multiply-accumulates of one forward pass on the example inputs, from
            PyTorch's ``FlopCounterMode``: convolutions and matrix products, attention
            scores included (elementwise operations and normalisation are not counted).
        bytes: Size of ``torch.save(model.state_dict())``.
    """

    params: int
    nonzero: int
    macs: int
    bytes: int

    @property
    def flops(self) -> int:
        """Floating-point operations, ``2 * macs``."""
        return 2 * self.macs

    def __str__(self) -> str:
        return (f"{self.params:,} parameters ({self.nonzero:,} non-zero), "
                f"{self.macs / 1e6:,.2f} MMACs, {self.bytes / 1024:,.1f} KiB")


def count(model: nn.Module, example_inputs: Any) -> Counts:
    """Count parameters, non-zero parameters, MACs on ``example_inputs`` and saved bytes.

    The forward pass runs in eval mode without gradients; the model's mode is restored.
    """
    params = list({id(p): p for p in model.parameters()}.values())
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward(model, example_inputs)
    finally:
        model.train(was)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return Counts(
        params=sum(p.numel() for p in params),
        nonzero=sum(int(torch.count_nonzero(p)) for p in params),
        macs=counter.get_total_flops() // 2,
        bytes=buffer.getbuffer().nbytes,
    )


@dataclass(frozen=True)
class Latency:
    """Timing of one model among several timed together.

    Attributes:
        ms: Median milliseconds per call, over every call of every round.
        speedup: Median over rounds of (first model's median / this model's median), so
            noise that hits one round hits the baseline and the model alike.
    """

    ms: float
    speedup: float


def latency(models: Sequence[nn.Module], example_inputs: Any, *, rounds: int = 5,
            calls: int = 3, warmup: int = 2,
            clock: Callable[[], float] = time.perf_counter) -> list[Latency]:
    """Time forward passes of ``models`` on ``example_inputs``, interleaved, against the first.

    In eval mode under ``torch.inference_mode()``; each round times ``calls`` calls of every
    model, the order rotating from round to round. Modes are restored. ``clock`` is wall
    time by default; ``time.process_time`` with one thread measures the CPU time a pass
    costs, which other processes sharing the cores barely disturb.

    Raises:
        ValueError: if ``models`` is empty or ``rounds`` or ``calls`` is below 1.
    """
    if not models or rounds < 1 or calls < 1:
        raise ValueError(f"need at least one model, rounds >= 1 and calls >= 1; got "
                         f"{len(models)} models, rounds={rounds}, calls={calls}")
    modes = [m.training for m in models]
    times: list[list[float]] = [[] for _ in models]
    ratios: list[list[float]] = [[] for _ in models]
    try:
        with torch.inference_mode():
            for m in models:
                m.eval()
                for _ in range(warmup):
                    forward(m, example_inputs)
            for r in range(rounds):
                medians = [0.0] * len(models)
                for i in [(r + k) % len(models) for k in range(len(models))]:
                    run = []
                    for _ in range(calls):
                        start = clock()
                        forward(models[i], example_inputs)
                        run.append(clock() - start)
                    medians[i] = statistics.median(run)
                    times[i] += run
                for i, median in enumerate(medians):
                    ratios[i].append(medians[0] / median)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return [Latency(1e3 * statistics.median(t), statistics.median(q))
            for t, q in zip(times, ratios, strict=True)]
