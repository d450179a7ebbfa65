"""Report folders of ``secateurs tune`` and ``secateurs sensitivity``.

Both write the report folder of the demo (``report.md``, ``metrics.json``, PNG figures;
see :func:`secateurs.report.write_report`); ``metrics.json`` states the chosen
configuration, its sparsity, its metric and the baseline's under the key ``chosen``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..controllers.sensitivity import Sensitivity
from ..pruner import Pruner
from ..report import (
    Column,
    FigureSpec,
    Panel,
    RunRecord,
    markdown_table,
    plot_bars,
    plot_series,
    plot_xy,
    write_report,
)
from .trials import CHOICE_RULE, Config, pareto_front
from .tune import TuneResult

__all__ = ["label", "oneshot_metric", "write_sensitivity_report", "write_tune_report"]


def label(config: Config) -> str:
    """A short name of a configuration: its method, then its other options."""
    options = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
               for k, v in config.items() if k != "method"]
    return " ".join([str(config.get("method")), *options])


def _pct(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.1%}"


def _metric(key: str) -> Any:
    def cell(r: RunRecord) -> str:
        value, spread = r.metrics.get(key, math.nan), r.metrics.get(f"{key}_std")
        return f"{value:.4f}" + (f" ± {spread:.4f}" if spread is not None else "")

    return cell


_COLUMNS = (
    Column("configuration", lambda r: r.name),
    Column("val", _metric("val")),
    Column("test", _metric("test")),
    Column("sparsity", lambda r: _pct(r.metrics["sparsity"])),
    Column("MACs", lambda r: f"{int(r.metrics['macs']):,}"),
    Column("in budget", lambda r: "yes" if r.metrics.get("within", 0.0) else "no"),
    Column("Pareto", lambda r: "yes" if r.metrics.get("pareto", 0.0) else ""),
    Column("seconds", lambda r: f"{r.metrics.get('seconds', math.nan):.1f}"),
)


def _records(found: TuneResult, higher_is_better: bool) -> list[RunRecord]:
    front = {label(r.config) for r in pareto_front(found.results, "sparsity", "val",
                                                   maximize=(True, higher_is_better))}
    histories = {label(t.config): t.extra.get("history", {}) for t in found.trials
                 if t.fold in (0, 1)}
    sign = 1.0 if higher_is_better else -1.0
    records = [RunRecord("dense (baseline)", "The dense model.",
                         {**found.baseline.metrics, "within": 1.0}, {"method": "dense"})]
    for r in found.results:
        name = label(r.config)
        flags = {"within": float(sign * (r.metrics["val"] - found.limit) >= -1e-12),
                 "pareto": float(name in front)}
        epochs = dict(histories.get(name, {}))
        if epochs:
            epochs["epoch"] = [float(i + 1) for i in range(len(epochs.get("val", [])))]
        records.append(RunRecord(name, f"Method {r.config.get('method')}, mean over "
                                       f"{r.folds} fold(s).", {**r.metrics, **flags},
                                 dict(r.config), epochs=epochs))
    return records


def _tune_figures(found: TuneResult, records: Sequence[RunRecord], metric: str,
                  higher_is_better: bool) -> list[FigureSpec]:
    groups: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for r in found.results:
        xs = groups.setdefault(str(r.config.get("method")), ([], [], []))
        xs[0].append(r.metrics["sparsity"])
        xs[1].append(r.metrics["macs"])
        xs[2].append(r.metrics["val"])
    chosen = found.chosen
    limit = (found.limit, "budget")
    figures = []
    for key, name, index, log in (("sparsity", "sparsity", 0, False),
                                  ("macs", "non-zero MACs", 1, True)):
        front = pareto_front(found.results, key, "val",
                             maximize=(key == "sparsity", higher_is_better))
        line = ([r.metrics[key] for r in front], [r.metrics["val"] for r in front])
        point = None if chosen is None else (chosen.metrics[key], chosen.metrics["val"])
        curves = {g: (v[index], v[2]) for g, v in groups.items()}
        figures.append(FigureSpec(
            f"pareto_{key}.png", f"Validation {metric} against {name}, every configuration "
                                 f"(mean over folds), the Pareto front and the chosen one",
            functools.partial(plot_xy, curves, xlabel=name, ylabel=f"validation {metric}",
                              lines=False, front=line, chosen=point, hline=limit,
                              percent=(key == "sparsity", False), log_x=log,
                              title=f"{metric} against {name}")))
    if found.sensitivity is not None:
        figures.append(_sensitivity_figure(found.sensitivity, found.limit))
    controlled = {r.name: r.epochs for r in records if "level" in r.metrics and r.epochs}
    if controlled:
        figures.append(FigureSpec(
            "controllers.png", "Validation metric and sparsity after each epoch of the "
                               "metric-controlled runs",
            lambda p: plot_series(controlled, [Panel(("val",), f"validation {metric}"),
                                               Panel(("sparsity",), "sparsity", percent=True)],
                                  p, x="epoch", xlabel="epoch",
                                  title="Metric-driven control")))
    return figures


def _sensitivity_figure(sens: Sensitivity, limit: float | None) -> FigureSpec:
    return FigureSpec(
        "sensitivity.png", f"Validation {sens.metric} with one target pruned alone, one "
                           "shot, against its sparsity",
        lambda p: plot_xy(sens.curves(), p, xlabel="sparsity of the target",
                          ylabel=f"validation {sens.metric}", percent=(True, False),
                          hline=None if limit is None else (limit, "budget"),
                          title="Sensitivity of each target"))


def _chosen(found: TuneResult) -> dict[str, Any] | None:
    if found.chosen is None or found.final is None:
        return None
    final = found.final
    return {"config": found.chosen.config, "label": label(found.chosen.config),
            "sparsity": final.metrics["sparsity"], "val": final.metrics["val"],
            "test": final.metrics["test"], "macs": final.metrics["macs"],
            "search_val": found.chosen.metrics["val"],
            "search_sparsity": found.chosen.metrics["sparsity"],
            "weights": final.extra.get("weights"), "message": final.extra.get("message")}


def write_tune_report(found: TuneResult, folder: str | os.PathLike[str], *, metric: str,
                      higher_is_better: bool, command: str, settings: Mapping[str, Any]
                      ) -> Path:
    """Write the report of :func:`~secateurs.search.tune` into ``folder`` (the search's own).

    Returns:
        ``folder``.
    """
    records = _records(found, higher_is_better)
    chosen = _chosen(found)
    baseline = {k: found.baseline.metrics[k] for k in ("val", "test", "sparsity", "macs")}
    if chosen is None:
        verdict = f"No configuration met the budget ({metric} >= {found.limit:.4f})."
    else:
        verdict = (f"**Chosen** ({CHOICE_RULE}): `{chosen['label']}`, sparsity "
                   f"{chosen['sparsity']:.1%}, validation {metric} {chosen['val']:.4f}, "
                   f"test {chosen['test']:.4f}; baseline validation {baseline['val']:.4f}, "
                   f"test {baseline['test']:.4f}; budget: validation {metric} >= "
                   f"{found.limit:.4f}. Weights: `{chosen['weights']}`.")
    sections = []
    if found.sensitivity is not None:
        sections = ["## Sensitivity\n\nValidation metric with one target pruned alone, one "
                    "shot, at each sparsity:\n\n" + markdown_table(*found.sensitivity.table())]
    extra = {"rule": CHOICE_RULE, "limit": found.limit, "baseline": baseline,
             "chosen": chosen,
             "sensitivity": None if found.sensitivity is None else found.sensitivity.to_dict()}
    return write_report(folder, records, _COLUMNS, title="secateurs tune", command=command,
                        settings=settings, notes=[verdict], folder=folder, extra=extra,
                        figures=_tune_figures(found, records, metric, higher_is_better),
                        sections=sections)


@torch.no_grad()
def oneshot_metric(model: nn.Module, allocation: Mapping[str, float],
                   evaluate: Any) -> float:
    """The metric of ``model`` with every target pruned one shot to ``allocation``.

    The weights are restored afterwards.
    """
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with Pruner(model, dict(allocation)) as pruner:
            pruner.update()
        return float(evaluate(model))
    finally:
        model.load_state_dict(saved)


def write_sensitivity_report(sens: Sensitivity, base: str | os.PathLike[str], *, overall: float,
                             allocation: Mapping[str, float], pruned: float, test: float,
                             command: str, settings: Mapping[str, Any]) -> Path:
    """Write the report of ``secateurs sensitivity`` in a new folder under ``base``."""
    metrics = {"baseline": sens.baseline, "pruned": pruned, "test": test,
               "seconds": sens.seconds}
    record = RunRecord("sensitivity", "Each target pruned alone, one shot.", metrics,
                       dict(settings), layers=dict(allocation))
    columns = [Column("baseline", lambda r: f"{r.metrics['baseline']:.4f}"),
               Column(f"all targets at {overall:.0%} (allocated, one shot)",
                      lambda r: f"{r.metrics['pruned']:.4f}"),
               Column("seconds", lambda r: f"{r.metrics['seconds']:.1f}")]
    figures = [_sensitivity_figure(sens, None), FigureSpec(
        "allocation.png", f"Per-target sparsity allocated for {overall:.0%} overall",
        lambda p: plot_bars({"allocated": dict(allocation)}, p, percent=True,
                            ylabel="sparsity", xlabel="target", title="Allocation"))]
    chosen = {"allocation": dict(allocation), "sparsity": overall, "metric": pruned,
              "baseline": sens.baseline}
    return write_report(base, [record], columns, title="secateurs sensitivity",
                        command=command, settings=settings, figures=figures,
                        sections=[markdown_table(*sens.table(allocation=allocation))],
                        extra={"chosen": chosen, "sensitivity": sens.to_dict()},
                        notes=[f"Sparsities allocated for {overall:.0%} overall (equal damage "
                               f"across targets); validation {sens.metric} of the model with "
                               f"every target pruned one shot to them: {pruned:.4f} (baseline "
                               f"{sens.baseline:.4f}, no fine-tuning)."])
