"""Reports of training runs: tables, plots, and a report folder.

Everything here works on plain records (:class:`RunRecord`: final metrics, settings,
per-step and per-epoch histories, per-layer values), so any command that trains or
measures several runs can write the same kind of report.

A report folder ``<base>/<YYYYmmdd-HHMMSS>/`` holds ``report.md`` (table, settings,
figures), ``metrics.json`` (everything, histories included) and PNG figures drawn
with matplotlib's non-interactive Agg canvas, so no display is needed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

__all__ = [
    "Column",
    "FigureSpec",
    "Panel",
    "RunRecord",
    "machine",
    "markdown_table",
    "new_report_dir",
    "plot_bars",
    "plot_series",
    "plot_xy",
    "print_table",
    "text_table",
    "training_figures",
    "write_metrics",
    "write_report",
]

#: A run's history: key -> one value per step or epoch.
Series = Mapping[str, Sequence[float]]


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


# -- tables ----------------------------------------------------------------------------


def _check_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"every row needs {len(header)} cells like the header "
                             f"{list(header)}, got {list(row)}")


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned table: first column left-aligned, the others right-aligned.

    Raises:
        ValueError: if a row's length differs from the header's.
    """
    _check_rows(header, rows)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """GitHub-flavoured markdown table, numeric columns right-aligned like :func:`text_table`.

    Raises:
        ValueError: if a row's length differs from the header's.
    """
    _check_rows(header, rows)

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    align = ["---", *["---:"] * (len(header) - 1)]
    return "\n".join([line(header), "|" + "|".join(align) + "|", *map(line, rows)])


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                file: IO[str] | None = None) -> None:
    """Print a table: with ``rich`` on a terminal when it is installed, else plain text."""
    out = sys.stdout if file is None else file
    if not (out.isatty() and _print_rich(header, rows, out)):
        print(text_table(header, rows), file=out)


def _print_rich(header: Sequence[str], rows: Sequence[Sequence[str]], out: IO[str]) -> bool:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: the plain table needs nothing
        return False
    _check_rows(header, rows)
    table = Table(*header)
    for column in table.columns[1:]:
        column.justify = "right"
    for row in rows:
        table.add_row(*row)
    Console(file=out).print(table)
    return True


# -- figures ----------------------------------------------------------------------------


def _colors(names: Sequence[str]) -> dict[str, str]:
    """The same color for a run in every figure, by its position."""
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


_STYLES = ("-", "--", ":", "-.")


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
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
    fig = Figure(figsize=(8, 2.6 * len(panels) + 0.6), layout="constrained")
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
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
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
    fig = Figure(figsize=(max(6.0, 1.6 * len(categories) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (run, per_run) in enumerate(values.items()):
        xs = [j + (i - (len(values) - 1) / 2) * width for j, c in enumerate(categories)
              if c in per_run]
        ys = [per_run[c] for c in categories if c in per_run]
        bars = ax.bar(xs, ys, width, label=run, color=colors[run])
        ax.bar_label(bars, fmt="{:.0%}" if percent else "{:.3g}", fontsize="x-small")
    ax.set_xticks(range(len(categories)), categories, rotation=15, ha="right")
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.set_ylim(0, 1.08)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.grid(axis="y", alpha=0.3)
    if values:
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)


#: Points of :func:`plot_xy`: name -> ``(xs, ys)``.
Curves = Mapping[str, tuple[Sequence[float], Sequence[float]]]


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
    fig = Figure(figsize=(8, 4.6), layout="constrained")
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
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    return _save(fig, path)


# -- the report folder ---------------------------------------------------------------------


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


def _jsonable(value: Any) -> Any:
    """JSON has no NaN or Inf: they become ``null``; tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
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
    path.write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    return path


@dataclass(frozen=True)
class FigureSpec:
    """A figure of a report: file name, caption, and how to draw it into a path."""

    filename: str
    caption: str
    draw: Callable[[Path], Path]


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


def _settings_md(settings: Mapping[str, Any]) -> list[str]:
    return [f"- `{key}`: `{value}`" for key, value in settings.items()]


def write_report(
    base: str | os.PathLike[str],
    records: Sequence[RunRecord],
    columns: Sequence[Column],
    *,
    title: str,
    command: str,
    settings: Mapping[str, Any],
    figures: Sequence[FigureSpec] | None = None,
    notes: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    folder: str | os.PathLike[str] | None = None,
    sections: Sequence[str] = (),
) -> Path:
    """Write a report folder ``<base>/<YYYYmmdd-HHMMSS>/`` and return its path.

    It holds ``report.md`` (the table of ``columns`` over ``records``, the settings, the
    notes and the figures embedded), ``metrics.json`` (see :func:`write_metrics`) and the
    figures as PNG files.

    Args:
        base: Folder under which the report folder is created.
        records: The runs, in table order.
        columns: Table columns.
        title: Report title.
        command: The command that reproduces the report.
        settings: Settings shared by all runs.
        figures: Figures to draw; ``None`` for :func:`training_figures`.
        notes: Paragraphs added after the table.
        extra: Further top-level entries of ``metrics.json``.
        folder: Write into this existing folder instead of a new timestamped one (a
            resumed run rewrites its own report).
        sections: Markdown blocks added after the notes (further tables).
    """
    folder = new_report_dir(base) if folder is None else Path(folder)
    figures = training_figures(records) if figures is None else figures
    for figure in figures:
        figure.draw(folder / figure.filename)
    write_metrics(folder / "metrics.json", title=title, command=command, settings=settings,
                  records=records, extra=extra)
    info = machine()
    header = [c.header for c in columns]
    rows = [[c.cell(r) for c in columns] for r in records]
    lines = [f"# {title}", "", f"Reproduce with `{command}`.", "",
             f"Machine: {info['cpu_cores']} CPU cores, torch {info['torch']}, "
             f"Python {info['python']}.", "", markdown_table(header, rows), ""]
    for note in notes:
        lines += [note, ""]
    for section in sections:
        lines += [section, ""]
    lines += ["## Runs", ""]
    for r in records:
        lines += [f"### {r.name}", "", r.description, "", *_settings_md(r.settings), ""]
    lines += ["## Shared settings", "", *_settings_md(settings), "", "## Figures", ""]
    for figure in figures:
        lines += [f"![{figure.caption}]({figure.filename})", "", f"*{figure.caption}.*", ""]
    (folder / "report.md").write_text("\n".join(lines))
    return folder
