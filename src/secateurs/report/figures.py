"""Figures of reports: PNG files drawn on matplotlib's non-interactive Agg canvas.

No display is needed, and matplotlib (slow to import) is loaded only when a figure is
drawn, so reading records or writing tables does not pay for it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .records import FigureSpec, RunRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Curves", "Panel", "Series", "plot_bars", "plot_series", "plot_xy",
           "training_figures"]

#: A run's history: key -> one value per step or epoch.
Series = Mapping[str, Sequence[float]]

#: Points of :func:`plot_xy`: name -> ``(xs, ys)``.
Curves = Mapping[str, tuple[Sequence[float], Sequence[float]]]


@dataclass(frozen=True)
class Panel:
    """One panel of :func:`plot_series`: history keys drawn on one y axis.

    Attributes:
        keys: History keys (up to four) sharing the panel, with different line styles.
        ylabel: Label of the y axis.
        percent: Format the y axis as a percentage of 1.
        log: Logarithmic y axis.
        labels: Legend label of each key (defaults to the key).
        ylim: ``(bottom, top)`` of the y axis; ``None`` for either end lets it fit the data.
    """

    keys: tuple[str, ...]
    ylabel: str
    percent: bool = False
    log: bool = False
    labels: tuple[str, ...] = ()
    ylim: tuple[float | None, float | None] | None = None


_STYLES = ("-", "--", ":", "-.")


def _colors(names: Sequence[str]) -> dict[str, str]:
    """The same color for a run in every figure, by its position."""
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def _figure(**options: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**options)


def _percent() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0)


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_series(
    histories: Mapping[str, Series],
    panels: Sequence[Panel],
    path: str | os.PathLike[str],
    *,
    x: str | None = None,
    xlabel: str = "step",
    title: str = "",
) -> Path:
    """Line plots of histories, one panel per :class:`Panel`, one color per run.

    Args:
        histories: Run name -> history (key -> values). A run lacking a panel's key is
            left out of that panel.
        panels: Panels, stacked vertically, sharing the x axis.
        path: PNG file to write.
        x: History key holding the x values (e.g. ``"epoch"``); ``None`` uses 0, 1, 2...
        xlabel: Label of the x axis.
        title: Figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: if ``panels`` is empty, or a panel has more than four keys.
    """
    if not panels or any(len(p.keys) > len(_STYLES) for p in panels):
        raise ValueError(f"plot_series needs at least one panel, each of 1 to {len(_STYLES)} "
                         f"keys; got {[p.keys for p in panels]}")
    colors = _colors(list(histories))
    # Earlier runs are drawn wider, so runs with identical curves all stay visible.
    widths = {run: 1.3 + 0.7 * (len(histories) - 1 - i) for i, run in enumerate(histories)}
    fig = _figure(figsize=(8, 2.6 * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        labels = panel.labels or panel.keys
        for run, history in histories.items():
            for key, label, style in zip(panel.keys, labels, _STYLES, strict=False):
                if key not in history:
                    continue
                ys = list(history[key])
                xs = list(history[x]) if x is not None else list(range(len(ys)))
                name = f"{run}, {label}" if len(panel.keys) > 1 else run
                ax.plot(xs, ys, style, color=colors[run], label=name, linewidth=widths[run])
        _decorate(ax, panel)
    axes[-1].set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _decorate(ax: Any, panel: Panel) -> None:
    ax.set_ylabel(panel.ylabel)
    if panel.log:
        ax.set_yscale("log")
    if panel.percent:
        ax.yaxis.set_major_formatter(_percent())
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if len(handles) > 3:  # many entries would hide the curves: put them beside the axes
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif handles:
        ax.legend(fontsize="small", loc="best")


def plot_bars(
    values: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    ylabel: str = "",
    xlabel: str = "",
    percent: bool = False,
) -> Path:
    """Grouped bars: one group per category (e.g. layer), one bar per run.

    Args:
        values: Run name -> category -> value; categories keep their first-seen order.
        path: PNG file to write.
        title: Figure title.
        ylabel: Label of the y axis.
        xlabel: Label of the x axis.
        percent: Format the y axis as a percentage of 1 (and label bars likewise).

    Returns:
        ``path``.
    """
    categories = list(dict.fromkeys(c for per_run in values.values() for c in per_run))
    colors = _colors(list(values))
    width = 0.8 / max(len(values), 1)
    fig = _figure(figsize=(max(6.0, 1.6 * len(categories) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (run, per_run) in enumerate(values.items()):
        xs = [j + (i - (len(values) - 1) / 2) * width for j, c in enumerate(categories)
              if c in per_run]
        ys = [per_run[c] for c in categories if c in per_run]
        bars = ax.bar(xs, ys, width, label=run, color=colors[run])
        ax.bar_label(bars, fmt="{:.0%}" if percent else "{:.3g}", fontsize="x-small")
    ax.set_xticks(range(len(categories)), categories, rotation=15, ha="right")
    if percent:
        ax.yaxis.set_major_formatter(_percent())
        ax.set_ylim(0, 1.08)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.grid(axis="y", alpha=0.3)
    if values:
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_xy(
    curves: Curves,
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    ylabel: str,
    lines: bool = True,
    front: tuple[Sequence[float], Sequence[float]] | None = None,
    chosen: tuple[float, float] | None = None,
    hline: tuple[float, str] | None = None,
    percent: tuple[bool, bool] = (False, False),
    log_x: bool = False,
    title: str = "",
) -> Path:
    """Points or lines against a numeric x axis, one color per name.

    Metric against sparsity with one line per layer (sensitivity), or trials as points
    with their Pareto front and the chosen one (a search).

    Args:
        curves: Name -> ``(xs, ys)``.
        path: PNG file to write.
        xlabel: Label of the x axis.
        ylabel: Label of the y axis.
        lines: Join each name's points with a line; otherwise draw them as a scatter.
        front: ``(xs, ys)`` of a Pareto front, drawn as a dark line through its points.
        chosen: ``(x, y)`` of a chosen point, circled in red.
        hline: ``(height, label)`` of a dashed horizontal reference line (e.g. a budget).
        percent: Format the x and the y axis as percentages of 1.
        log_x: Logarithmic x axis.
        title: Figure title.

    Returns:
        ``path``.
    """
    colors = _colors(list(curves))
    fig = _figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.subplots()
    for name, (xs, ys) in curves.items():
        if lines:
            ax.plot(list(xs), list(ys), "o-", color=colors[name], label=name, markersize=3.5)
        else:
            ax.scatter(list(xs), list(ys), color=colors[name], label=name, s=22, zorder=3)
    if front is not None and len(front[0]):
        ax.plot(list(front[0]), list(front[1]), "-", color="0.2", linewidth=1,
                label="Pareto front", zorder=2)
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], s=160, facecolors="none", edgecolors="red",
                   linewidths=1.8, label="chosen", zorder=4)
    if hline is not None:
        ax.axhline(hline[0], color="0.3", linestyle="--", linewidth=1, label=hline[1] or None)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    _decorate(ax, Panel((), ylabel, percent=percent[1]))
    if percent[0]:
        ax.xaxis.set_major_formatter(_percent())
    return _save(fig, path)


def _tail_floor(histories: Mapping[str, Series], keys: Sequence[str]) -> float:
    """A y-axis floor showing every run's second half: its lowest value less a margin."""
    tails = [v for h in histories.values() for k in keys if k in h
             for v in list(h[k])[len(h[k]) // 2:] if math.isfinite(v)]
    if not tails:
        return 0.0
    return max(0.0, math.floor((min(tails) - 0.01) * 50) / 50)


def training_figures(records: Sequence[RunRecord]) -> list[FigureSpec]:
    """The figures of a set of training runs.

    Learning rate and sparsity against step (two panels); validation and test accuracy
    against epoch; per-layer sparsity of the runs that have per-layer values.
    """
    steps = {r.name: r.steps for r in records}
    epochs = {r.name: r.epochs for r in records}
    layers = {r.name: r.layers for r in records if r.layers}
    keys = ("val_accuracy", "test_accuracy")
    accuracy = Panel(keys, "accuracy", percent=True, labels=("validation", "test"),
                     ylim=(_tail_floor(epochs, keys), 1.003))
    figures = [
        FigureSpec("schedules.png", "Learning rate and sparsity against step "
                                    "(identical curves overlap)",
                   lambda p: plot_series(steps, [Panel(("lr",), "learning rate"),
                                                 Panel(("sparsity",), "sparsity", percent=True)],
                                         p, title="Learning rate and sparsity during training")),
        FigureSpec("accuracy.png", "Validation (solid) and test (dashed) accuracy per epoch, "
                                   "y axis zoomed on the second half of training",
                   lambda p: plot_series(epochs, [accuracy], p, x="epoch", xlabel="epoch",
                                         title="Accuracy after each epoch")),
    ]
    if layers:
        figures.append(FigureSpec(
            "layer_sparsity.png", "Sparsity of each target at the end of training",
            lambda p: plot_bars(layers, p, percent=True, ylabel="sparsity", xlabel="target",
                                title="Per-layer sparsity")))
    return figures
