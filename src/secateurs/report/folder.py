"""The report folder: ``report.md`` (table, settings, figures), ``metrics.json`` and PNGs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..tables import markdown_table
from .figures import training_figures
from .records import Column, FigureSpec, RunRecord, machine, new_report_dir, write_metrics

__all__ = ["write_report"]


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
    notes and the figures embedded), ``metrics.json`` (see
    :func:`~secateurs.report.write_metrics`) and the figures as PNG files.

    Args:
        base: Folder under which the report folder is created.
        records: The runs, in table order.
        columns: Table columns.
        title: Report title.
        command: The command that reproduces the report.
        settings: Settings shared by all runs.
        figures: Figures to draw; ``None`` for :func:`~secateurs.report.training_figures`.
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
