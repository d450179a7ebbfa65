"""Reports of training runs: tables, plots, and a report folder.

Everything here works on plain records (:class:`RunRecord`: final metrics, settings,
per-step and per-epoch histories, per-layer values), so any command that trains or
measures several runs can write the same kind of report.

A report folder ``<base>/<YYYYmmdd-HHMMSS>/`` holds ``report.md`` (table, settings,
figures), ``metrics.json`` (everything, histories included) and PNG figures drawn
with matplotlib's non-interactive Agg canvas, so no display is needed; matplotlib is
imported only when a figure is drawn.

The package: :mod:`.records` (runs, ``metrics.json``, the folder's name), :mod:`.figures`
(the plots) and :mod:`.folder` (:func:`write_report`); tables come from
:mod:`secateurs.tables`, re-exported here.
"""

from __future__ import annotations

from ..tables import markdown_table, print_table, text_table
from .figures import Curves, Panel, Series, plot_bars, plot_series, plot_xy, training_figures
from .folder import write_report
from .records import Column, FigureSpec, RunRecord, machine, new_report_dir, write_metrics

__all__ = [
    "Column",
    "Curves",
    "FigureSpec",
    "Panel",
    "RunRecord",
    "Series",
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
