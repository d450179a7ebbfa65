"""The benchmark scripts: rows and numbers of the step-overhead report, memory accounting,
and how ``run_all.py`` gathers sections. No timing is asserted: only that it was measured."""

from __future__ import annotations

import importlib.util
import itertools
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


so = load("step_overhead")
run_all = load("run_all")
imports = load("imports")
ROWS = [(m, v) for m in so.WORKLOADS for v in so.VARIANTS]
#: Rows of the tables per optimizer: a quick run measures the quick optimizers only.
TIMED = [(m, o, v) for m in so.WORKLOADS for o in so.QUICK_OPTIMIZERS for v in so.VARIANTS]


def table_after(text: str, heading: str) -> list[list[str]]:
    """Body rows of the first markdown table after ``### heading``."""
    lines = text.split(f"### {heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    body = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[c.strip() for c in line.strip("|").split("|")] for line in body[2:]]


def positive(cell: str) -> float:
    value = float(cell.replace(",", ""))
    assert math.isfinite(value) and value > 0, cell
    return value


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("results")
    subprocess.run([sys.executable, str(BENCHMARKS / "step_overhead.py"), "--quick",
                    "--results-dir", str(out)], check=True, capture_output=True, text=True,
                   timeout=600)
    return (out / "step_overhead.md").read_text()


@pytest.mark.slow
def test_quick_report_has_a_section_with_command_and_machine(report: str) -> None:
    assert report.startswith("## ")
    assert "`python benchmarks/step_overhead.py --quick`" in report
    assert "CPU cores" in report and "torch " in report and "set_num_threads(" in report


@pytest.mark.slow
def test_quick_report_times_every_variant_on_every_model(report: str) -> None:
    rows = table_after(report, "Step time")
    assert [(r[0], r[1], r[2]) for r in rows] == TIMED
    for model, opt, method, *cells in rows:
        # while pruning: median, ratio, CPU, ratio, mean, ratio; steady: the same but mean
        for cell in cells[:10]:
            positive(cell)
        if method == "dense":
            assert cells[1] == cells[3] == cells[7] == cells[9] == "1.000"
            assert cells[-1] == "0"
        else:
            positive(cells[10]), positive(cells[11])  # mask-update step and its ratio
            assert int(cells[-1]) == so.PLANS["quick"].updates, (model, opt, method)
    costs = table_after(report, "Where `Pruner.step()` spends its time")
    assert {(r[0], r[1]) for r in costs} == {(m, o) for m, o, _ in TIMED}
    for row in costs:
        positive(row[3]), positive(row[4]), positive(row[5])


@pytest.mark.slow
def test_quick_report_memory_pruner_one_byte_torch_prune_at_least_eight(report: str) -> None:
    rows = table_after(report, "Memory")
    assert [(r[0], r[1]) for r in rows] == ROWS
    for model, method, _, per_weight, holders, *rss in rows:
        expected = {"dense": lambda b: b == 0.0, "secateurs.Pruner": lambda b: b == 1.0,
                    "torch.nn.utils.prune": lambda b: b >= 8.0}[method]
        assert expected(float(per_weight)), (method, per_weight, holders)
        if model == next(iter(so.WORKLOADS)):  # quick runs probe the first workload's RSS
            positive(rss[0]), positive(rss[2])  # peak RSS and RSS at the end, MiB
        else:
            assert rss == ["-"] * 4
    allocs = table_after(report, "Allocations in one steady-state step (`torch.profiler`, "
                                 "`profile_memory=True`)")
    assert [(r[0], r[1], r[2]) for r in allocs] == TIMED
    for row in allocs:
        positive(row[3]), positive(row[4])


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: a second thread only adds hand-offs, slow on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(widths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       updates=st.integers(1, 3))
def test_memory_accounting_is_exact(one_thread: None, widths: list[int], updates: int) -> None:
    """Pruner: exactly one byte per target weight (bool masks); torch.nn.utils.prune:
    weight_orig and a float mask (8 bytes) plus one 4-byte float mask per update held by its
    hooks."""
    sizes = [6, *widths, 10]

    def build() -> nn.Module:
        return nn.Sequential(*(nn.Linear(a, b) for a, b in itertools.pairwise(sizes)))

    workload = so.Workload(build, (6,), 8, "test")
    plan = so.Plan(every=1, updates=updates, steady_rounds=1)
    runs = so.build_runs(workload, plan)
    batches = so.make_batches(workload, plan, count=1)
    for _ in range(plan.begin + updates + 2):
        for run in runs.values():
            run.step(*batches[0])
    n = sum(a * b for a, b in itertools.pairwise(sizes))
    assert so.added_bytes(runs["dense"], runs["dense"]) == {}
    assert so.added_bytes(runs["secateurs.Pruner"], runs["dense"]) == {
        "pruner.masks._masks": n}
    theirs = so.added_bytes(runs["torch.nn.utils.prune"], runs["dense"])
    assert theirs["weight_orig"] == 4 * n and theirs["weight_mask"] == 4 * n
    assert sum(theirs.values()) == (8 + 4 * updates) * n


def test_frameworks_table_gives_medians_and_ratios_of_rounds() -> None:
    frameworks = load("_frameworks")
    rounds = [([(0.010, 0.020)] * 3, [(0.011, 0.021)] * 3),
              ([(0.020, 0.040)] * 3, [(0.021, 0.042)] * 3)]
    rows = markdown_rows(frameworks.table({"setting": rounds}))
    assert rows == [["setting", "15.00", "16.00", "1.075", "30.00", "31.50", "1.050"]]


def test_run_all_finds_scripts_and_gathers_sections_in_name_order(tmp_path: Path) -> None:
    names = [p.name for p in run_all.scripts()]
    assert "step_overhead.py" in names and "run_all.py" not in names
    assert names == sorted(names)
    (tmp_path / "b.md").write_text("## B\n\nsecond\n")
    (tmp_path / "a.md").write_text("## A\n\nfirst\n")
    (tmp_path / "notes.txt").write_text("not a section")
    text = run_all.collect(tmp_path)
    assert text.startswith("# Benchmark results")
    assert "medians on a shared, noisy" in text and "same run" in text
    assert text.index("## A") < text.index("## B") and "not a section" not in text
    assert text.endswith("second\n")


def markdown_rows(text: str) -> list[list[str]]:
    """Body rows of the first markdown table in ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    body = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[c.strip() for c in line.strip("|").split("|")] for line in body[2:]]


def test_imports_table_gives_differences_and_ratios_against_the_baseline() -> None:
    timings = {imports.BASELINE: imports.Timing([2.0, 1.0, 3.0], [2.0, 2.0, 2.0]),
               "import secateurs": imports.Timing([0.5, 0.5, 9.0], [1.0, 1.0, 1.0])}
    rows = markdown_rows(imports.table(timings))
    assert rows[0] == [f"`{imports.BASELINE}`", "2.000 s", "2.000 s", "+0.000 s", "1.00x",
                       "+0.000 s", "1.00x"]
    assert rows[1] == ["`import secateurs`", "0.500 s", "1.000 s", "-1.500 s", "0.25x",
                       "-1.000 s", "0.50x"]


@pytest.mark.slow
def test_imports_benchmark_times_every_command_in_fresh_processes(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(BENCHMARKS / "imports.py"), "--repeats", "1",
                    "--results-dir", str(tmp_path)], check=True, capture_output=True, text=True,
                   timeout=300)
    report = (tmp_path / "imports.md").read_text()
    assert report.startswith("## ") and "`python benchmarks/imports.py --repeats 1`" in report
    rows = markdown_rows(report)
    names = [f"`{name}`" for name in imports.commands()]
    assert [r[0] for r in rows] == names
    assert {"`import torch, torch_pruning, safetensors`", "`import secateurs`",
            "`secateurs --help`"} <= set(names)
    for row in rows:
        positive(row[1].removesuffix(" s")), positive(row[2].removesuffix(" s"))
    assert rows[0][3:] == ["+0.000 s", "1.00x", "+0.000 s", "1.00x"]
