"""Tables, rendered one way everywhere: plain aligned text, markdown, or ``rich`` on a terminal.

Text columns (the first ``left``) are left-aligned and numbers right-aligned; footer rows
(totals) sit below a second rule. :meth:`Pruner.summary <secateurs.Pruner.summary>`,
:class:`~secateurs.PruneReport` and every report of the command line print through here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO

__all__ = ["markdown_table", "print_table", "text_table"]


def _check_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"every row needs {len(header)} cells like the header "
                             f"{list(header)}, got {list(row)}")


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1,
               footer: Sequence[Sequence[str]] = ()) -> str:
    """Plain aligned table: the first ``left`` columns left-aligned, the others right-aligned;
    ``footer`` rows (such as a total) below a second rule.

    Raises:
        ValueError: if a row's length differs from the header's.
    """
    _check_rows(header, [*rows, *footer])
    widths = [max(len(r[i]) for r in [header, *rows, *footer]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(w) if i < left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    tail = [rule, *map(line, footer)] if footer else []
    return "\n".join([line(header), rule, *map(line, rows), *tail])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], *,
                   left: int = 1) -> str:
    """GitHub-flavoured markdown table, aligned like :func:`text_table`.

    Raises:
        ValueError: if a row's length differs from the header's.
    """
    _check_rows(header, rows)

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    align = [*["---"] * left, *["---:"] * (len(header) - left)][: len(header)]
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
