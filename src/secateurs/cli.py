"""The ``secateurs`` command line.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a function adding its
arguments to its parser and a function running it, which returns the exit status.
The parser is built from plain data in this module; torch, the tasks, the search and the
reports are imported only when a command runs, so ``--help`` answers at once.

Example:
    $ secateurs demo --quick
    $ secateurs tune --task digits --budget 0.01
    $ secateurs sensitivity --task mnist1d --option channels=128
    $ secateurs prune ./my-model --calibration calib.txt --sparsity 0.5 --out ./pruned
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one line of help, its arguments and what runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


def _integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``, with a message naming the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="fewer epochs, for a result in seconds")
    parser.add_argument("--epochs", type=_integer(1), metavar="N",
                        help="epochs of every run (overrides the default of the mode)")
    parser.add_argument("--seed", type=_integer(0), default=0, metavar="S",
                        help="seed of the data split, initial weights and batches (default 0)")
    parser.add_argument("--out", default="runs", metavar="DIR",
                        help="folder under which the timestamped report folder is created "
                             "(default: runs)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _demo(args: argparse.Namespace) -> int:
    from .demo import QUICK_EPOCHS, DemoConfig, run_demo
    from .report import print_table

    epochs = args.epochs or (QUICK_EPOCHS if args.quick else DemoConfig.epochs)
    config = DemoConfig(epochs=epochs, seed=args.seed, progress=not args.no_progress)
    print(f"Training {epochs} epochs per run on scikit-learn's digits (seed {args.seed}).")
    result = run_demo(config, args.out, quick=args.quick)
    print_table(*result.table())
    print(f"Report written to {result.report_dir / 'report.md'}")
    return 0


def _floats(text: str) -> list[float]:
    """An argparse type: comma-separated numbers, e.g. ``0.5,0.9``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    """An argparse type: comma-separated names."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _option(text: str) -> tuple[str, Any]:
    """An argparse type: ``KEY=VALUE``; the value is read as JSON when it can be."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


#: Tasks that ship with secateurs (``secateurs.tasks.available_tasks()`` lists them, with any
#: registered since; they are named here so that ``--help`` need not import torch).
BUILTIN_TASKS = ("digits", "mnist1d")


def _task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="digits", metavar="NAME",
                        help=f"a built-in task ({', '.join(BUILTIN_TASKS)}) or module:function "
                             "returning a secateurs.tasks.Task (default: digits)")
    parser.add_argument("--option", type=_option, action="append", default=[],
                        metavar="KEY=VALUE", help="an option of the task's factory, e.g. "
                                                  "channels=128 for mnist1d (repeatable)")
    parser.add_argument("--epochs", type=_integer(1), metavar="N",
                        help="epochs of dense training (default: the task's own)")
    parser.add_argument("--seed", type=_integer(0), default=0, metavar="S",
                        help="seed of the split, the initial weights and the batches (default 0)")
    parser.add_argument("--out", default="runs", metavar="DIR",
                        help="folder under which the timestamped report folder is created "
                             "(default: runs)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--threads", type=_integer(1), default=1, metavar="N",
                        help="torch intra-op threads (default 1: small models only lose "
                             "time synchronising more)")


def _tune_arguments(parser: argparse.ArgumentParser) -> None:
    _task_arguments(parser)
    parser.add_argument("--budget", type=float, default=0.01, metavar="B",
                        help="how far the validation metric may fall below the dense model's "
                             "(default 0.01: one point of accuracy)")
    parser.add_argument("--relative", action="store_true",
                        help="read --budget as a fraction of the dense model's metric")
    parser.add_argument("--folds", type=_integer(1), default=1, metavar="K",
                        help="k-fold cross-validation over the training and validation "
                             "examples (default 1: the task's own split)")
    parser.add_argument("--finetune-epochs", type=_integer(1), metavar="N",
                        help="epochs of every trial, from the dense weights (default 20)")
    parser.add_argument("--methods", type=_names, default=list(_TUNE_METHODS[:4]),
                        metavar="M,...", help="methods tried, among "
                                              f"{', '.join(_TUNE_METHODS)} (default: "
                                              f"{','.join(_TUNE_METHODS[:4])})")
    parser.add_argument("--sparsities", type=_floats, metavar="S,...",
                        help="sparsities of gradual and oneshot (default 0.5,0.7,0.8,0.9,0.95; "
                             "with --quick 0.5,0.9)")
    parser.add_argument("--criteria", type=_names, default=["magnitude"], metavar="C,...",
                        help="criteria of budget, gradual and oneshot (default magnitude)")
    parser.add_argument("--thresholds", type=_floats, metavar="T,...",
                        help="final thresholds of clipping; the largest is the ceiling of "
                             "adaptive-clipping (default 0.02,0.05,0.1; with --quick 0.05)")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the search stored in this report folder")
    parser.add_argument("--quick", action="store_true",
                        help="few epochs and candidates, for a result in seconds")


#: Methods ``secateurs tune`` knows how to enumerate, the default ones first.
_TUNE_METHODS = ("budget", "gradual", "oneshot", "clipping", "adaptive-clipping")


def _configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .search import grid

    unknown = sorted(set(args.methods) - set(_TUNE_METHODS))
    if unknown:
        raise SystemExit(f"secateurs tune: unknown methods {unknown}; choose among "
                         f"{', '.join(_TUNE_METHODS)}")
    space: dict[str, list[dict[str, Any]]] = {
        "budget": grid({"method": ["budget"], "criterion": args.criteria}),
        "gradual": grid({"method": ["gradual"], "criterion": args.criteria,
                         "sparsity": args.sparsities}),
        "oneshot": grid({"method": ["oneshot"], "criterion": args.criteria,
                         "sparsity": args.sparsities}),
        "clipping": grid({"method": ["clipping"], "threshold": args.thresholds}),
        "adaptive-clipping": [{"method": "adaptive-clipping",
                               "threshold": max(args.thresholds)}],
    }
    return [c for m in args.methods for c in space[m]]


def _load_task(args: argparse.Namespace) -> Any:
    from .tasks import get_task

    options = dict(args.option)
    options.setdefault("seed", args.seed)
    try:
        task = get_task(args.task, **options)
    except (TypeError, ValueError, ImportError) as error:
        raise SystemExit(f"secateurs: cannot build task {args.task!r}: {error}") from None
    epochs = args.epochs or (QUICK_DENSE_EPOCHS if getattr(args, "quick", False) else None)
    if epochs is not None:
        if not dataclasses.is_dataclass(task):
            raise SystemExit(f"secateurs: --epochs needs a dataclass task, {args.task!r} "
                             f"returned {type(task).__name__}")
        task = dataclasses.replace(task, epochs=epochs)  # type: ignore[type-var]
    return task


#: Dense epochs of ``--quick`` runs.
QUICK_DENSE_EPOCHS = 8


def _tune(args: argparse.Namespace) -> int:
    from .report import new_report_dir, print_table
    from .search import Recipe, tune
    from .search.report import label, write_tune_report

    task = _load_task(args)
    if args.sparsities is None:
        args.sparsities = [0.5, 0.9] if args.quick else [0.5, 0.7, 0.8, 0.9, 0.95]
    if args.thresholds is None:
        args.thresholds = [0.05] if args.quick else [0.02, 0.05, 0.1]
    configs = _configs(args)
    folder = Path(args.resume) if args.resume else new_report_dir(args.out)
    recipe = Recipe(epochs=args.finetune_epochs or (4 if args.quick else 20), seed=args.seed)
    print(f"Tuning {len(configs)} configurations on {task.name} ({args.folds} fold(s), "
          f"{recipe.epochs} epochs each), budget {args.budget:g}"
          f"{' relative' if args.relative else ''}; stored in {folder}.")
    found = tune(task, configs, tolerance=args.budget, relative=args.relative,
                 folds=args.folds, recipe=recipe, folder=folder,
                 progress=not args.no_progress)
    settings = {"task": args.task, "options": dict(args.option), "budget": args.budget,
                "relative": args.relative, "folds": args.folds, "metric": task.metric,
                **dataclasses.asdict(recipe)}
    write_tune_report(found, folder, metric=task.metric,
                      higher_is_better=task.higher_is_better, command=args.command_line,
                      settings=settings)
    rows = [[label(r.config), f"{r.metrics['val']:.4f}", f"{r.metrics['test']:.4f}",
             f"{r.metrics['sparsity']:.1%}"] for r in found.results]
    print_table(["configuration", f"val {task.metric}", f"test {task.metric}", "sparsity"],
                [["dense (baseline)", f"{found.baseline.metrics['val']:.4f}",
                  f"{found.baseline.metrics['test']:.4f}", "0.0%"], *rows])
    if found.final is None:
        print(f"No configuration met the budget (validation {task.metric} >= "
              f"{found.limit:.4f}).")
    else:
        m = found.final.metrics
        print(f"Chosen: {label(found.final.config)}: sparsity {m['sparsity']:.1%}, validation "
              f"{task.metric} {m['val']:.4f} (limit {found.limit:.4f}), test {m['test']:.4f}.")
    print(f"Report written to {folder / 'report.md'}")
    return 0


#: Default of ``secateurs sensitivity --sparsities``: the library's own
#: ``DEFAULT_SPARSITIES`` (a test keeps them equal), spelt here for a torch-free ``--help``.
SENSITIVITY_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


def _sensitivity_arguments(parser: argparse.ArgumentParser) -> None:
    _task_arguments(parser)
    parser.add_argument("--sparsities", type=_floats, default=list(SENSITIVITY_SPARSITIES),
                        metavar="S,...", help="sparsities each target is pruned to (default "
                                              f"{','.join(map(str, SENSITIVITY_SPARSITIES))})")
    parser.add_argument("--overall", type=float, default=0.9, metavar="S",
                        help="overall sparsity to allocate across targets (default 0.9)")
    parser.add_argument("--weights", metavar="PATH",
                        help="analyse these trained weights (a state dict saved by torch) "
                             "instead of training the dense model")
    parser.add_argument("--quick", action="store_true", help="fewer dense epochs")


def _sensitivity(args: argparse.Namespace) -> int:
    import torch

    from .controllers.sensitivity import measure_sensitivity
    from .report import print_table
    from .search import train_dense
    from .search.report import oneshot_metric, write_sensitivity_report

    task = _load_task(args)
    if args.weights:
        model = task.model(args.seed)
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    else:
        print(f"Training the dense model on {task.name} for {task.epochs} epochs.")
        model = train_dense(task, args.seed, progress=not args.no_progress)

    def evaluate(m: Any) -> float:
        return float(task.evaluate(m, "val")[task.metric])

    try:
        sens = measure_sensitivity(model, evaluate, args.sparsities, metric=task.metric,
                                   higher_is_better=task.higher_is_better,
                                   progress=not args.no_progress)
        allocation = sens.allocate(args.overall)
    except ValueError as error:
        raise SystemExit(f"secateurs sensitivity: {error}") from None
    pruned = oneshot_metric(model, allocation, evaluate)
    print_table(*sens.table(allocation=allocation))
    settings = {"task": args.task, "options": dict(args.option), "epochs": task.epochs,
                "seed": args.seed, "overall": args.overall, "weights": args.weights}
    folder = write_sensitivity_report(sens, args.out, overall=args.overall,
                                      allocation=allocation, pruned=pruned,
                                      test=float(task.evaluate(model, "test")[task.metric]),
                                      command=args.command_line, settings=settings)
    print(f"Validation {task.metric}: dense {sens.baseline:.4f}; every target at its "
          f"allocated sparsity ({args.overall:.0%} overall), one shot: {pruned:.4f}.")
    print(f"Report written to {folder / 'report.md'}")
    return 0


#: Criteria a recipe can name, spelt here for a torch-free ``--help`` (a test keeps them
#: registered).
PRUNE_CRITERIA = ("contribution", "magnitude", "random")


def _prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a Hugging Face model folder, or module:function returning "
                             "secateurs.hub.LoadedModel or (model, tokenizer)")
    parser.add_argument("--calibration", required=True, metavar="FILE",
                        help="calibration text: .txt (one sample per line, or per paragraph "
                             "when blank lines separate them) or .jsonl (a 'text' field)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="new folder for the pruned model, recipe.yaml, report.md, "
                             "metrics.json and layers.png")
    parser.add_argument("--recipe", metavar="R.yaml",
                        help="the run as a recipe; the options below override its fields")
    parser.add_argument("--eval", metavar="FILE", dest="eval_file",
                        help="text on which fidelity is measured before and after "
                             "(perplexity for causal LMs, mean cosine for encoders)")
    parser.add_argument("--device", metavar="D",
                        help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    group = parser.add_argument_group("recipe fields")
    group.add_argument("--criterion", metavar="NAME",
                       help=f"{', '.join(PRUNE_CRITERIA)}, ... (default contribution)")
    group.add_argument("--option", type=_option, action="append", default=None,
                       metavar="KEY=VALUE", help="a criterion option, e.g. p=1 (repeatable)")
    group.add_argument("--sparsity", type=float, metavar="S",
                       help="fraction of weights removed per target (default 0.5; with "
                            "N:M, 1 - N/M)")
    group.add_argument("--granularity", metavar="G", help="element or N:M such as 2:4")
    group.add_argument("--scope", choices=("row", "layer", "global"))
    group.add_argument("--allocation", choices=("uniform", "owl"),
                       help="owl: per-block sparsities from outlier ratios (Yin et al. 2023)")
    group.add_argument("--targets", metavar="REGEX",
                       help="targets by regular expression (default: the linear layers of "
                            "the repeated blocks; lm_head and embeddings excluded)")
    group.add_argument("--exclude", metavar="REGEX", help="targets left dense")
    group.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                       help="update kept weights to minimise each layer's output error")
    group.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                       help="prune block by block on the pruned blocks' outputs (default on)")
    group.add_argument("--samples", type=_integer(1), metavar="N",
                       help="calibration samples (default 128)")
    group.add_argument("--sequence-length", type=_integer(1), metavar="N",
                       help="tokens per sample at most (default 512)")
    group.add_argument("--batch-size", type=_integer(1), metavar="N",
                       help="samples per batch (default 8)")
    group.add_argument("--seed", type=_integer(0), metavar="S",
                       help="seed of the draw of calibration samples (default 0)")
    parser.add_argument("--threads", type=_integer(1), metavar="N",
                        help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _recipe_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = {k: getattr(args, k) for k in ("criterion", "sparsity", "granularity", "scope",
                                            "allocation", "targets", "exclude",
                                            "reconstruct", "sequential")}
    if args.option is not None:
        fields["criterion_options"] = dict(args.option)
    calibration = {k: getattr(args, k) for k in ("samples", "sequence_length", "batch_size",
                                                 "seed")}
    fields["calibration"] = {k: v for k, v in calibration.items() if v is not None}
    return {k: v for k, v in fields.items() if v is not None and v != {}}


def _prune(args: argparse.Namespace) -> int:
    from .recipes import Recipe, prune_checkpoint, read_mapping

    try:
        data = read_mapping(args.recipe) if args.recipe else {}
        changes = _recipe_fields(args)
        if "calibration" in changes:
            changes["calibration"] = {**data.get("calibration", {}), **changes["calibration"]}
        recipe = Recipe.from_dict({**data, **changes})
        run = prune_checkpoint(args.model, args.calibration, args.out, recipe,
                               eval_file=args.eval_file, device=args.device,
                               progress=not args.no_progress, command=args.command_line)
    except ValueError as error:
        raise SystemExit(f"secateurs prune: {error}") from None
    prune, fid = run.metrics["prune"], run.metrics["fidelity"]
    print(f"Pruned {len(run.report.targets)} targets to {prune['sparsity']:.1%} sparsity in "
          f"{prune['seconds']:.1f} s ({prune['mode']}).")
    if fid is not None:
        print(f"{fid['metric']} on {fid['samples']} samples: {fid['before']:.4f} before, "
              f"{fid['after']:.4f} after.")
    for note in run.report.notes:
        print(f"Note: {note}")
    print(f"Model, recipe and report written to {run.folder}")
    return 0


#: The subcommands, by name.
COMMANDS: dict[str, Command] = {
    "demo": Command(
        "demo", "train a small CNN densely, pruned and clipped; write a report",
        _demo_arguments, _demo,
        description="Train a small CNN on scikit-learn's handwritten digits three times from "
                    "the same initial weights (dense; gradual magnitude pruning to 90% "
                    "sparsity; dynamic weight clipping), print one table and write a report "
                    "folder with metrics.json, report.md and plots."),
    "tune": Command(
        "tune", "find the sparsest model within a metric budget; write a report",
        _tune_arguments, _tune,
        description="Train the task's dense model, then fine-tune it under each candidate "
                    "configuration (Budget with sensitivity-based per-layer sparsities, "
                    "gradual and one-shot pruning at several sparsities, dynamic clipping at "
                    "several thresholds), optionally with k-fold cross-validation; choose "
                    "the sparsest configuration whose validation metric is within --budget "
                    "of the dense model's. Trials are stored as they finish: --resume DIR "
                    "continues an interrupted search."),
    "sensitivity": Command(
        "sensitivity", "prune each layer alone and derive per-layer sparsities",
        _sensitivity_arguments, _sensitivity,
        description="Prune each target of the task's trained model alone, one shot, at "
                    "several sparsities; print and plot the validation metric against "
                    "sparsity, one line per target, and allocate per-target sparsities "
                    "meeting --overall while protecting the sensitive targets."),
    "prune": Command(
        "prune", "prune your own checkpoint in one shot; write a model folder and a report",
        _prune_arguments, _prune,
        description="Prune a Hugging Face model folder (or module:function) in one shot "
                    "from calibration text, as a recipe says (criterion, sparsity or OWL "
                    "allocation, granularity, reconstruction, block-by-block calibration), "
                    "and write a folder that from_pretrained loads, with the applied "
                    "recipe, report.md, metrics.json and a per-layer plot."),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="secateurs",
        description="Make neural networks smaller and faster while they train.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('secateurs')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        child = sub.add_parser(command.name, help=command.help,
                               description=command.description or command.help)
        command.add_arguments(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 on bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["secateurs", *map(shlex.quote, argv)])
    threads = getattr(args, "threads", None)
    if threads is None:
        return args.run(args)
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return args.run(args)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    sys.exit(main())
