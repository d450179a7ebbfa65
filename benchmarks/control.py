"""Metric-driven control: the highest sparsity reached within a 1-point accuracy budget.

On two tasks, from the same trained dense model and with the same fine-tuning (epochs,
optimizer, cosine-decayed learning rate), three ways of pruning are compared:

- (a) ``Budget`` with sensitivity-based per-layer sparsities: one-shot sensitivity scan of
  every layer, then a cubic schedule whose progress the controller advances while the
  validation accuracy stays within 1 point of the dense model's, pauses, rolls back and
  lowers the target otherwise (``secateurs.search`` method ``budget``);
- (b) a fixed cubic schedule (Zhu & Gupta 2017) to a final sparsity, the same for every
  layer (method ``gradual``);
- (c) one-shot magnitude pruning to a final sparsity, the same for every layer, then the
  same fine-tuning with the masks fixed (method ``oneshot``).

(a) finds its own sparsity in one run. (b) and (c) are first run to (a)'s final sparsity,
then bisected over a grid of sparsities above it (if that run was within budget) or below
it (if not): their highest sparsity within budget costs several runs, all counted.
"Within budget" is the rule the controller uses: validation accuracy >= dense - 0.01.

Tasks: ``mnist1d`` (Greydanus 2020, generated offline; the paper's CNN architecture at
128 channels: the 25-channel original, 5,210 weights, has no redundancy left to prune; 10,000
examples, so that 2,000 validation examples resolve a 1-point budget: with the paper's 400,
one point is four examples) and scikit-learn's ``digits`` (the demo's CNN).

Run: ``python benchmarks/control.py`` (``--quick`` for a smoke run of about a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from secateurs.controllers.sensitivity import Sensitivity, measure_sensitivity
from secateurs.report import markdown_table, text_table
from secateurs.search import Recipe, Setting, run_method, train_dense
from secateurs.tasks import get_task

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COMMAND = "python benchmarks/control.py"
THREADS = 1
BUDGET = 0.01
#: Sparsities (b) and (c) are tried at, beside (a)'s.
GRID = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)


@dataclass(frozen=True)
class Plan:
    """One task of the benchmark and how long everything trains."""

    task: str
    options: dict[str, Any]
    dense_epochs: int
    recipe: Recipe
    label: str


PLANS = {
    "full": (
        Plan("mnist1d", {"channels": 128, "num_samples": 10000, "val_fraction": 0.25}, 20,
             Recipe(epochs=16, lr_scale=0.3),
             "mnist1d, 10,000 generated examples (6,000 train, 2,000 validation, 2,000 test), "
             "the paper's CNN at 128 channels (105,610 weights)"),
        Plan("digits", {}, 30, Recipe(epochs=20, lr_scale=0.5),
             "digits (1,257 train, 180 validation, 360 test), the demo's CNN (38,282 "
             "weights)"),
    ),
    "quick": (
        Plan("digits", {}, 4, Recipe(epochs=3), "digits (quick)"),
        Plan("mnist1d", {"channels": 16, "num_samples": 1000}, 15, Recipe(epochs=5),
             "mnist1d, 16 channels, 1,000 examples (quick)"),
    ),
}


@dataclass
class Run:
    """One pruned run: its final sparsity and accuracies, and its wall-clock time."""

    method: str
    target: float
    sparsity: float
    val: float
    test: float
    seconds: float
    within: bool
    note: str = ""


@dataclass
class TaskResult:
    """Everything measured on one task."""

    plan: Plan
    baseline_val: float
    baseline_test: float
    dense_seconds: float
    val_examples: int
    sensitivity: Sensitivity | None = None
    runs: dict[str, list[Run]] = field(default_factory=dict)

    @property
    def limit(self) -> float:
        return self.baseline_val - BUDGET

    def best(self, method: str) -> Run | None:
        """The sparsest run of ``method`` within budget."""
        within = [r for r in self.runs[method] if r.within]
        return max(within, key=lambda r: r.sparsity) if within else None

    def cost(self, method: str) -> float:
        return sum(r.seconds for r in self.runs[method])


def _run(setting: Setting, config: dict[str, Any], limit: float) -> Run:
    start = time.perf_counter()
    _, metrics, extra = run_method(setting, config)
    seconds = time.perf_counter() - start
    return Run(config["method"], float(config.get("sparsity", float("nan"))),
               metrics["sparsity"], metrics["val"], metrics["test"], seconds,
               metrics["val"] >= limit - 1e-12, str(extra.get("message", "")))


def _probe(setting: Setting, method: str, start: float, limit: float,
           log: Callable[[str], None]) -> list[Run]:
    """Runs of ``method``: at ``start``, then a bisection over the grid above it (if it is
    within budget) or below it (if not) for the highest sparsity within budget.

    The bisection assumes that accuracy falls as sparsity rises; every run is kept.
    """
    runs: list[Run] = []

    def run(s: float) -> bool:
        runs.append(_run(setting, {"method": method, "sparsity": s}, limit))
        log(f"  {method} {s:.3f}: val {runs[-1].val:.4f} ({runs[-1].seconds:.0f} s)")
        return runs[-1].within

    within = run(start)
    grid = sorted(g for g in GRID if (g > start + 1e-9 if within else g < start - 1e-9))
    low, high = -1, len(grid)  # grid[low] is within budget (or none), grid[high] is not
    while high - low > 1:
        mid = (low + high) // 2
        if run(grid[mid]):
            low = mid
        else:
            high = mid
    return runs


def run_task(plan: Plan, log: Callable[[str], None]) -> TaskResult:
    """Dense training, then (a), (b) and (c) on one task."""
    task = dataclasses.replace(get_task(plan.task, seed=0, **plan.options),
                               epochs=plan.dense_epochs)
    start = time.perf_counter()
    dense = train_dense(task, plan.recipe.seed)
    dense_seconds = time.perf_counter() - start
    val, test = task.evaluate(dense, "val")["accuracy"], task.evaluate(dense, "test")["accuracy"]
    log(f"{plan.task}: dense val {val:.4f} test {test:.4f} ({dense_seconds:.0f} s)")
    result = TaskResult(plan, val, test, dense_seconds, len(task.data.val))

    def sensitivity() -> Sensitivity:
        if result.sensitivity is None:
            result.sensitivity = measure_sensitivity(
                dense, lambda m: task.evaluate(m, "val")["accuracy"])
        return result.sensitivity

    setting = Setting(task, {k: v.clone() for k, v in dense.state_dict().items()}, val,
                      BUDGET, False, plan.recipe, sensitivity)
    run_a = _run(setting, {"method": "budget"}, result.limit)
    log(f"  (a) budget: sparsity {run_a.sparsity:.4f} val {run_a.val:.4f} "
        f"({run_a.seconds:.0f} s)")
    result.runs["budget"] = [run_a]
    start_at = round(run_a.sparsity, 3)
    result.runs["gradual"] = _probe(setting, "gradual", start_at, result.limit, log)
    result.runs["oneshot"] = _probe(setting, "oneshot", start_at, result.limit, log)
    return result


# -- the report -------------------------------------------------------------------------------

NAMES = {"budget": "(a) Budget + sensitivity allocation",
         "gradual": "(b) cubic schedule, uniform layers",
         "oneshot": "(c) one-shot magnitude + fine-tuning"}


def summary_rows(results: list[TaskResult]) -> list[list[str]]:
    rows = []
    for r in results:
        rows.append([r.plan.task, "dense", "0.0%", f"{r.baseline_val:.4f}",
                     f"{r.baseline_test:.4f}", "1", f"{r.dense_seconds:.1f}", "1.00", ""])
        a_sparsity = r.runs["budget"][0].sparsity
        for method, name in NAMES.items():
            best = r.best(method)
            same = next((x for x in r.runs[method] if abs(x.sparsity - a_sparsity) < 5e-3),
                        None)
            at_a = "-" if method == "budget" or same is None else \
                f"{same.val:.4f}{'' if same.within else ' (out)'}"
            cost = r.cost(method) + (r.sensitivity.seconds if method == "budget"
                                     and r.sensitivity else 0.0)
            rows.append([r.plan.task, name,
                         "none" if best is None else f"{best.sparsity:.1%}",
                         "-" if best is None else f"{best.val:.4f}",
                         "-" if best is None else f"{best.test:.4f}",
                         str(len(r.runs[method])), f"{cost:.1f}",
                         f"{cost / r.dense_seconds:.2f}", at_a])
    return rows


HEADER = ["task", "method", "highest sparsity within budget", "val acc", "test acc", "runs",
          "wall-clock (s)", "x dense training", "val acc at (a)'s sparsity"]


def probe_rows(results: list[TaskResult]) -> list[list[str]]:
    return [[r.plan.task, NAMES[m][:3], "-" if x.method == "budget" else f"{x.target:.3f}",
             f"{x.sparsity:.1%}", f"{x.val:.4f}", f"{x.test:.4f}",
             "yes" if x.within else "no", f"{x.seconds:.1f}"]
            for r in results for m in NAMES for x in r.runs[m]]


def _aim(results: list[TaskResult]) -> list[str]:
    lines = []
    for r in results:
        a = r.best("budget")
        sa = 0.0 if a is None else a.sparsity
        others = {m: (0.0 if r.best(m) is None else r.best(m).sparsity)  # type: ignore[union-attr]
                  for m in ("gradual", "oneshot")}
        beats = all(sa > s + 1e-9 for s in others.values())
        reach = f"; reaches >= 90%: {'yes' if sa >= 0.9 else 'no'}" \
            if r.plan.task == "mnist1d" else ""
        drops = ", ".join(
            f"{key} {100 * (best.test - r.baseline_test):+.1f} pt" for key, best in
            (("(a)", r.best("budget")), ("(b)", r.best("gradual")), ("(c)", r.best("oneshot")))
            if best is not None)
        lines.append(f"- **{r.plan.task}**: (a) {sa:.1%} vs (b) {others['gradual']:.1%} and "
                     f"(c) {others['oneshot']:.1%} within budget: (a) beats both: "
                     f"{'yes' if beats else 'no'}{reach}. Judged on {r.val_examples:,} "
                     f"validation examples (one point: {r.val_examples / 100:.1f} examples); "
                     f"test accuracy of each result against the dense model's "
                     f"{r.baseline_test:.4f}: {drops}.")
    return lines


def write_markdown(results: list[TaskResult], path: Path, quick: bool) -> None:
    command = COMMAND + (" --quick" if quick else "")
    cpu = platform.processor() or platform.machine()
    plans = "; ".join(f"**{r.plan.task}**: {r.plan.label}, dense {r.plan.dense_epochs} epochs, "
                      f"every pruned run {r.plan.recipe.epochs} epochs at "
                      f"{r.plan.recipe.lr_scale:g} x the task's learning rate"
                      for r in results)
    parts = [
        "## Metric-driven control: highest sparsity within a 1-point accuracy budget", "",
        f"Command: `{command}`", "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
        f"`torch.set_num_threads({THREADS})`, Python {platform.python_version()}.", "",
        f"Setup: {plans}. Seed 0 throughout; one run per configuration (times are that "
        "run's wall clock; the ratio is to the dense training measured in the same run). "
        "Budget: validation accuracy >= dense - 0.01. (a) ramps a cubic schedule to at most "
        f"{results[0].plan.recipe.final:.0%} over the first half of its run; (b) ramps to its "
        "final sparsity over the same steps; (c) prunes at step 0. (b) and (c) start at (a)'s "
        f"sparsity, then bisect the grid {list(GRID)} above it (if within budget) or below it "
        "(if not) for their highest sparsity within budget; their cost counts every run. "
        "(a)'s cost includes the sensitivity scan.", "",
        "### Highest sparsity within budget", "",
        markdown_table(HEADER, summary_rows(results)), "",
        "Aim: (a) reaches at least 90% sparsity on mnist1d within the budget, and beats (b) "
        "and (c) in sparsity at equal budget.", "", *_aim(results), "",
        "### Every run", "",
        markdown_table(["task", "method", "target", "sparsity", "val acc", "test acc",
                        "within", "seconds"], probe_rows(results)), "",
    ]
    for r in results:
        a = r.runs["budget"][0]
        parts += [f"(a) on {r.plan.task}: {a.note}", ""]
        if r.sensitivity is not None:
            header, rows = r.sensitivity.table(allocation=r.sensitivity.allocate(
                min(a.sparsity, r.sensitivity.max_overall() - 1e-6)))
            parts += [f"Sensitivity of {r.plan.task} (validation accuracy, one layer pruned "
                      f"alone, one shot; scan {r.sensitivity.seconds:.1f} s) and the per-layer "
                      "sparsities allocated at (a)'s final sparsity:", "",
                      markdown_table(header, rows), ""]
    path.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Highest sparsity within a metric budget.")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help=f"where control.md goes (default {RESULTS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    print(f"torch.set_num_threads({THREADS})", flush=True)
    results = [run_task(plan, lambda line: print(line, flush=True))
               for plan in PLANS["quick" if args.quick else "full"]]
    print(text_table(HEADER, summary_rows(results)))
    print("\n".join(_aim(results)))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / "control.md"
    write_markdown(results, out, args.quick)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
