"""Tables, plots and report folders written from synthetic records."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secateurs.report import (
    Column,
    Panel,
    RunRecord,
    markdown_table,
    new_report_dir,
    plot_bars,
    plot_series,
    print_table,
    text_table,
    training_figures,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _record(name: str, sparsity: float, layers: bool = True) -> RunRecord:
    steps = 50
    return RunRecord(
        name, f"{name} run", {"accuracy": 0.9 + sparsity / 20, "sparsity": sparsity},
        {"update_every": 10},
        steps={"loss": [1.0 / (t + 1) for t in range(steps)],
               "lr": [0.1 * (1 - t / steps) for t in range(steps)],
               "sparsity": [min(sparsity, t / 40) for t in range(steps)]},
        epochs={"epoch": [1.0, 2.0, 3.0], "val_accuracy": [0.5, 0.8, 0.9],
                "test_accuracy": [0.45, 0.82, math.nan]},
        layers={"conv.weight": sparsity / 2, "fc.weight": sparsity} if layers else {},
    )


COLUMNS = (Column("run", lambda r: r.name),
           Column("accuracy", lambda r: f"{r.metrics['accuracy']:.1%}"),
           Column("sparsity", lambda r: f"{r.metrics['sparsity']:.1%}"))


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


# -- tables --------------------------------------------------------------------------------

cell = st.text(alphabet="abcXYZ0123456789.,%/-", min_size=1, max_size=12)


@given(header=st.lists(cell, min_size=1, max_size=5).flatmap(
    lambda h: st.tuples(st.just(h), st.lists(st.lists(cell, min_size=len(h),
                                                      max_size=len(h)), max_size=6))))
def test_text_table_aligns_every_column(header: tuple[list[str], list[list[str]]]) -> None:
    head, rows = header
    lines = text_table(head, rows).splitlines()
    assert len(lines) == len(rows) + 2
    if len(head) > 1:  # the last column is right-aligned: every line ends at its edge
        assert len({len(line) for line in lines}) == 1
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for line, row in zip([lines[0], *lines[2:]], [head, *rows], strict=True):
        assert line.split() == row
        assert line.startswith(row[0])
        for i in range(1, len(row)):  # right-aligned: each cell ends at its column's edge
            end = sum(widths[: i + 1]) + 2 * i
            assert line[end - len(row[i]):end] == row[i]
    assert set(lines[1]) <= {"-", " "}


def test_text_table_right_aligns_numbers_and_left_aligns_names() -> None:
    lines = text_table(["run", "accuracy"], [["dense", "98.1%"], ["a-longer-name", "7%"]])
    body = lines.splitlines()
    assert body[2].startswith("dense ") and body[2].endswith(" 98.1%")
    assert body[3].endswith("      7%")


def test_markdown_table_escapes_pipes_and_right_aligns() -> None:
    table = markdown_table(["run", "sparsity"], [["a|b", "90.0%"]]).splitlines()
    assert table == ["| run | sparsity |", "|---|---:|", "| a\\|b | 90.0% |"]


@pytest.mark.parametrize("render", [text_table, markdown_table])
def test_tables_reject_rows_of_the_wrong_length(render: object) -> None:
    with pytest.raises(ValueError, match="2 cells"):
        render(["a", "b"], [["only one"]])  # type: ignore[operator]


def test_print_table_is_plain_text_when_not_a_terminal() -> None:
    out = io.StringIO()
    print_table(["run", "x"], [["dense", "1"]], file=out)
    assert out.getvalue() == text_table(["run", "x"], [["dense", "1"]]) + "\n"


def test_print_table_uses_rich_on_a_terminal() -> None:
    pytest.importorskip("rich")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    print_table(["run", "x"], [["dense", "1"], ["pruned", "22"]], file=out)
    text = out.getvalue()
    assert "dense" in text and "pruned" in text and text != text_table(["run", "x"], [])
    assert "─" in text or "━" in text  # a rich box, not the plain rule of dashes


# -- plots ---------------------------------------------------------------------------------


def test_plot_series_writes_a_png_and_skips_runs_without_the_key(tmp_path: Path) -> None:
    histories = {"dense": {"lr": [0.1, 0.05]}, "pruned": {"lr": [0.1, 0.05],
                                                          "sparsity": [0.0, 0.5]}}
    path = plot_series(histories, [Panel(("lr",), "learning rate", log=True),
                                   Panel(("sparsity",), "sparsity", percent=True)],
                       tmp_path / "s.png", title="t")
    assert path == tmp_path / "s.png" and _is_png(path)


def test_plot_series_needs_a_panel(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one panel"):
        plot_series({"a": {"x": [1.0]}}, [], tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_plot_bars_writes_a_png_for_runs_with_different_layers(tmp_path: Path) -> None:
    values = {"a": {"conv": 0.2, "fc": 0.9}, "b": {"fc": 0.5, "head": 0.1}}
    path = plot_bars(values, tmp_path / "b.png", title="per layer", ylabel="sparsity",
                     percent=True)
    assert _is_png(path)


# -- the report folder ---------------------------------------------------------------------


def test_training_figures_draw_layer_bars_only_for_runs_that_have_layers() -> None:
    names = [f.filename for f in training_figures([_record("dense", 0.0, layers=False)])]
    assert names == ["schedules.png", "accuracy.png"]
    names = [f.filename for f in training_figures([_record("dense", 0.0, layers=False),
                                                   _record("pruned", 0.9)])]
    assert names == ["schedules.png", "accuracy.png", "layer_sparsity.png"]


def test_write_report_writes_markdown_json_and_figures(tmp_path: Path) -> None:
    records = [_record("dense", 0.0, layers=False), _record("pruned", 0.9)]
    folder = write_report(tmp_path / "runs", records, COLUMNS, title="T", command="cmd --x",
                          settings={"seed": 0, "span": (0.1, 0.6)}, notes=["A note."])
    assert folder.parent == tmp_path / "runs"
    for name in ("schedules.png", "accuracy.png", "layer_sparsity.png"):
        assert _is_png(folder / name)
    md = (folder / "report.md").read_text()
    assert md.startswith("# T\n") and "`cmd --x`" in md and "A note." in md
    assert "| pruned | 94.5% | 90.0% |" in md and "![" in md and "(accuracy.png)" in md
    data = json.loads((folder / "metrics.json").read_text())
    assert set(data["runs"]) == {"dense", "pruned"}
    assert data["settings"] == {"seed": 0, "span": [0.1, 0.6]}
    assert data["runs"]["pruned"]["layers"] == {"conv.weight": 0.45, "fc.weight": 0.9}
    assert data["runs"]["dense"]["epochs"]["test_accuracy"][-1] is None  # NaN is not JSON
    assert len(data["runs"]["dense"]["steps"]["lr"]) == 50
    assert data["machine"]["cpu_cores"] >= 1


def test_new_report_dir_never_reuses_a_folder(tmp_path: Path) -> None:
    folders = {new_report_dir(tmp_path) for _ in range(3)}
    assert len(folders) == 3 and all(f.is_dir() and f.parent == tmp_path for f in folders)
