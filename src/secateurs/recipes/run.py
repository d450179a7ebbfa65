"""A whole ``secateurs prune`` run: a model and text files in, a model folder and a report
out.

The output folder holds the pruned model as ``from_pretrained`` loads it (safetensors
weights with the zeros in them, config, tokenizer files), the applied ``recipe.yaml``
(every field: the run repeats bit for bit), ``metrics.json`` (per-target sparsity and
relative output error, times, peak memory, fidelity before and after), ``report.md`` and
``layers.png`` (per-target sparsity and error).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..hub import LoadedModel, fidelity, load_model, read_texts, sample_texts
from ..oneshot import PruneReport
from ..report.records import jsonable, machine
from ..tables import markdown_table
from .schema import Recipe

__all__ = ["PruneRun", "prune_checkpoint"]

RECIPE_FILE = "recipe.yaml"


@dataclass
class PruneRun:
    """What :func:`prune_checkpoint` wrote and measured.

    Attributes:
        folder: The output folder.
        report: The :class:`~secateurs.oneshot.PruneReport`.
        model: The pruned model (as loaded, on its device).
        metrics: What ``metrics.json`` holds.
    """

    folder: Path
    report: PruneReport
    model: LoadedModel
    metrics: dict[str, Any] = field(default_factory=dict)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {str(out)!r} exists and is not empty; choose a new "
                         "folder (nothing is overwritten)")


def _rss_bytes() -> int | None:
    """Resident memory now (Linux), or ``None``."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _measure(loaded: LoadedModel, batches: list[Any] | None,
             reference: torch.Tensor | None) -> tuple[str, float, torch.Tensor | None] | None:
    return None if batches is None else fidelity(loaded, batches, reference)


def prune_checkpoint(model: str | os.PathLike[str], calibration: str | os.PathLike[str],
                     out: str | os.PathLike[str], recipe: Recipe, *,
                     eval_file: str | os.PathLike[str] | None = None,
                     device: str | None = None, progress: bool = True,
                     command: str = "") -> PruneRun:
    """Prune ``model`` as ``recipe`` says on the text of ``calibration``; write ``out``.

    Args:
        model: A Hugging Face folder or ``module:function`` (see :func:`~secateurs.hub.load_model`).
        calibration: A ``.txt`` or ``.jsonl`` file of calibration text.
        out: A new (or empty) folder for the results.
        recipe: The run.
        eval_file: Text on which fidelity is measured before and after.
        device: ``cpu``, ``cuda``, ``cuda:1``, ... (default: CUDA when available).
        progress: Show progress bars.
        command: The command line, recorded in the report.

    Raises:
        ValueError: for an output folder that is not empty, unreadable or empty text
            files, a model that cannot be loaded, or what :func:`~secateurs.prune_`
            refuses; raised before anything is written.
    """
    out = Path(out)
    _check_out(out)
    texts = read_texts(calibration)
    held = read_texts(eval_file) if eval_file is not None else None
    loaded = load_model(model, device=device)
    cal = recipe.calibration
    chosen = sample_texts(texts, cal.samples, cal.seed)
    batches = loaded.batches(chosen, cal.sequence_length, cal.batch_size)
    eval_batches = None if held is None else loaded.batches(held, cal.sequence_length,
                                                            cal.batch_size)
    before = _measure(loaded, eval_batches, None)
    cuda = next(loaded.model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss = _rss_bytes()
    tic = time.perf_counter()
    report = recipe.apply(loaded.model, batches, progress=progress)
    seconds = time.perf_counter() - tic
    memory = {"peak_rss_bytes": _peak_rss_bytes(), "rss_before_prune_bytes": rss,
              "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    after = _measure(loaded, eval_batches, None if before is None else before[2])
    out.mkdir(parents=True, exist_ok=True)
    _save_model(loaded, out, report)
    recipe.to_yaml(out / RECIPE_FILE)
    metrics = _metrics(report, recipe, before, after, memory, seconds, command=command,
                       model=str(model), calibration=(str(calibration), len(chosen)),
                       eval_file=None if held is None else (str(eval_file), len(held)),
                       device=str(next(loaded.model.parameters()).device), kind=loaded.kind)
    (out / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=1) + "\n")
    _plot_layers(report, out / "layers.png")
    (out / "report.md").write_text(_markdown(metrics, report))
    return PruneRun(out, report, loaded, metrics)


def _save_model(loaded: LoadedModel, out: Path, report: PruneReport) -> None:
    """``save_pretrained`` where the model has it (its zeros in safetensors), else a
    safetensors file of the state dict; the tokenizer's files beside it."""
    save = getattr(loaded.model, "save_pretrained", None)
    if callable(save):
        save(out)
    else:
        from ..export import save_pruned  # checkpoint machinery: only for plain modules

        save_pruned(out / "model.safetensors", loaded.model, report.masks)
    if loaded.tokenizer is not None and hasattr(loaded.tokenizer, "save_pretrained"):
        loaded.tokenizer.save_pretrained(out)


def _metrics(report: PruneReport, recipe: Recipe, before: Any, after: Any,
             memory: dict[str, Any], seconds: float, **about: Any) -> dict[str, Any]:
    fid = None
    if before is not None and after is not None:
        fid = {"metric": before[0], "before": before[1], "after": after[1],
               "samples": about["eval_file"][1], "file": about["eval_file"][0]}
    return {
        "title": "secateurs prune", "command": about["command"], "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": about["model"],
        "kind": about["kind"], "device": about["device"], "recipe": recipe.to_dict(),
        "calibration": {"file": about["calibration"][0], "samples": about["calibration"][1]},
        "fidelity": fid,
        "prune": {"seconds": seconds, "calibration_seconds": report.calibration_seconds,
                  "reconstruction_seconds": report.reconstruction_seconds,
                  "passes": report.passes, "mode": report.mode,
                  "block_calls": report.block_calls, "sparsity": report.sparsity(),
                  "targets": len(report.targets)},
        "memory": memory,
        "layers": {r.name: {"shape": list(r.shape), "sparsity": r.sparsity,
                            "relative_error": r.relative_error, "stage": r.stage,
                            "dead_features": r.dead_features} for r in report.targets},
        "notes": list(report.notes),
    }




def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def _markdown(m: dict[str, Any], report: PruneReport) -> str:
    p, mem, fid = m["prune"], m["memory"], m["fidelity"]
    rows = [["targets", str(p["targets"])], ["sparsity", f"{p['sparsity']:.2%}"],
            ["prune time", f"{p['seconds']:.2f} s (calibration {p['calibration_seconds']:.2f} s,"
                           f" reconstruction {p['reconstruction_seconds']:.2f} s)"],
            ["passes", f"{p['mode']}: {p['passes']} statistics passes, "
                       f"{p['block_calls']} single-block calls"],
            ["peak RSS (process)", _mib(mem["peak_rss_bytes"])],
            ["RSS before pruning", _mib(mem["rss_before_prune_bytes"])],
            ["peak CUDA memory", _mib(mem["cuda_peak_bytes"])]]
    if fid is not None:
        rows.append([f"{fid['metric']} on {fid['samples']} samples",
                     f"{fid['before']:.4f} before, {fid['after']:.4f} after"])
    layers = [[r.name, "x".join(map(str, r.shape)), f"{r.sparsity:.1%}",
               "-" if r.relative_error is None else f"{r.relative_error:.4g}", r.stage,
               str(r.dead_features)] for r in report.targets]
    lines = [f"# Pruned {m['model']}", "", f"Reproduce with `{m['command']}`." if m["command"]
             else "", "", f"Model kind {m['kind']}, device {m['device']}; machine "
             f"{m['machine']['cpu_cores']} CPU cores, torch {m['machine']['torch']}.", "",
             markdown_table(["", "value"], rows), "", *[f"- {n}" for n in report.notes], "",
             "## Recipe", "", "```yaml", Recipe.from_dict(m["recipe"]).to_yaml().rstrip(),
             "```", "", "## Targets", "",
             markdown_table(["target", "shape", "sparsity", "relative error", "stage",
                             "dead inputs"], layers),
             "", "![Per-target sparsity and relative output error](layers.png)", ""]
    return "\n".join(lines)


def _plot_layers(report: PruneReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = [r.name.removesuffix(".weight") for r in report.targets]
    xs = range(len(names))
    fig = Figure(figsize=(max(6.0, 0.18 * len(names) + 2), 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(xs, [r.sparsity for r in report.targets], color="tab:blue")
    top.set_ylabel("sparsity")
    top.set_ylim(0, 1)
    errors = [r.relative_error if r.relative_error is not None else math.nan
              for r in report.targets]
    bottom.bar(xs, errors, color="tab:red")
    bottom.set_ylabel("relative output error")
    if any(e > 0 for e in errors if not math.isnan(e)):
        bottom.set_yscale("log")
    if len(names) <= 60:
        bottom.set_xticks(list(xs), names, rotation=90, fontsize="x-small")
    else:
        bottom.set_xlabel("target (model order)")
    top.set_title("Sparsity and relative output error per target")
    fig.savefig(path, dpi=110)
