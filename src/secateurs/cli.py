"""The ``secateurs`` command line.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a function adding its
arguments to its parser and a function running it, which returns the exit status.
Heavy modules (torch models, matplotlib) are imported when a command runs, so
``--help`` answers at once.

Example:
    $ secateurs demo --quick
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import __version__

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


#: The subcommands, by name.
COMMANDS: dict[str, Command] = {
    "demo": Command(
        "demo", "train a small CNN densely, pruned and clipped; write a report",
        _demo_arguments, _demo,
        description="Train a small CNN on scikit-learn's handwritten digits three times from "
                    "the same initial weights (dense; gradual magnitude pruning to 90% "
                    "sparsity; dynamic weight clipping), print one table and write a report "
                    "folder with metrics.json, report.md and plots."),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="secateurs",
        description="Make neural networks smaller and faster while they train.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        child = sub.add_parser(command.name, help=command.help,
                               description=command.description or command.help)
        command.add_arguments(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
