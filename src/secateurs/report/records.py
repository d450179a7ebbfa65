"""Runs as reports see them, and the ``metrics.json`` that keeps everything about them."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Column", "FigureSpec", "RunRecord", "jsonable", "machine", "new_report_dir",
           "write_metrics"]


@dataclass
class RunRecord:
    """One run, as reports see it.

    Attributes:
        name: Short name of the run (table row, legend entry).
        description: One sentence saying what the run does.
        metrics: Final values, e.g. ``test_accuracy``, ``sparsity``, ``seconds``.
        settings: What was configured (JSON-serialisable values).
        steps: Per-step histories, key -> one value per step.
        epochs: Per-epoch histories, key -> one value per epoch.
        layers: Per-layer values (e.g. target name -> sparsity); empty when not relevant.
    """

    name: str
    description: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, list[float]] = field(default_factory=dict)
    epochs: dict[str, list[float]] = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Column:
    """A table column: header, and how a record's cell is rendered."""

    header: str
    cell: Callable[[RunRecord], str]


@dataclass(frozen=True)
class FigureSpec:
    """A figure of a report: file name, caption, and how to draw it into a path."""

    filename: str
    caption: str
    draw: Callable[[Path], Path]


def new_report_dir(base: str | os.PathLike[str]) -> Path:
    """Create and return ``<base>/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    Path(base).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = Path(base) / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a new report folder under {base}")


def machine() -> dict[str, Any]:
    """The machine a report was measured on: CPU cores, torch threads and versions."""
    return {"cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def jsonable(value: Any) -> Any:
    """JSON has no NaN or Inf: they become ``null``; tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_metrics(path: Path, *, title: str, command: str, settings: Mapping[str, Any],
                  records: Sequence[RunRecord], extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``metrics.json``: settings, machine, per run its metrics and histories, and
    the top-level entries of ``extra`` (e.g. the chosen configuration)."""
    payload = {
        "title": title, "command": command, "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": dict(settings),
        "runs": {r.name: {"description": r.description, "metrics": r.metrics,
                          "settings": r.settings, "steps": r.steps, "epochs": r.epochs,
                          "layers": r.layers} for r in records},
        **(extra or {}),
    }
    path.write_text(json.dumps(jsonable(payload), indent=1) + "\n")
    return path
