"""Start-up cost: ``import secateurs`` and ``secateurs --help`` against importing torch.

Every command runs as a whole fresh process, as a user's script or shell would: the
baseline imports what secateurs cannot do without (``torch``, ``torch_pruning``,
``safetensors``); ``import secateurs`` alone; ``import secateurs`` followed by the first use
of the core names (``Pruner``, ``prune_``, ``save``, ``controllers``), which is what a
pruning script pays; and the ``secateurs --help`` command line. The commands alternate in
rounds after one warm-up round (page cache, byte code), so machine noise hits them alike;
figures are medians of wall time and of CPU time (user + system, from
``resource.getrusage(RUSAGE_CHILDREN)`` before and after each run), with the difference and
the ratio against the baseline of the same run.

Usage: ``python benchmarks/imports.py [--quick] [--repeats N] [--results-dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPEATS = 5
QUICK_REPEATS = 2

#: Name of the baseline row.
BASELINE = "import torch, torch_pruning, safetensors"


def _cli() -> tuple[list[str], str]:
    """The ``secateurs`` console script next to this interpreter, else its module."""
    script = Path(sys.executable).with_name("secateurs")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)], "secateurs"
    return [sys.executable, "-m", "secateurs.cli"], "python -m secateurs.cli"


def commands() -> dict[str, list[str]]:
    """Row name -> command line, the baseline first."""
    py = sys.executable
    cli, _ = _cli()
    return {
        BASELINE: [py, "-c", "import torch, torch_pruning, safetensors"],
        "import secateurs": [py, "-c", "import secateurs"],
        "import secateurs + first use of the core": [
            py, "-c", "import secateurs as sc; sc.Pruner, sc.prune_, sc.save, sc.controllers"],
        "secateurs --help": [*cli, "--help"],
    }


@dataclass
class Timing:
    """Seconds of every run of one command."""

    wall: list[float]
    cpu: list[float]

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh process running ``argv`` (which must succeed)."""
    cpu, start = _children_cpu(), time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start, _children_cpu() - cpu


def measure(cmds: dict[str, list[str]], repeats: int) -> dict[str, Timing]:
    """Every command ``repeats`` times, interleaved in rounds after one warm-up round."""
    for argv in cmds.values():
        run_once(argv)
    timings = {name: Timing([], []) for name in cmds}
    for _ in range(repeats):
        for name, argv in cmds.items():
            wall, cpu = run_once(argv)
            timings[name].wall.append(wall)
            timings[name].cpu.append(cpu)
    return timings


def table(timings: dict[str, Timing]) -> str:
    """A markdown table: medians, then differences and ratios against the baseline."""
    base = timings[BASELINE]
    head = ["command", "wall", "CPU", "wall - baseline", "wall / baseline", "CPU - baseline",
            "CPU / baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in timings.items():
        cells = [f"`{name}`", f"{t.median_wall:.3f} s", f"{t.median_cpu:.3f} s",
                 f"{t.median_wall - base.median_wall:+.3f} s",
                 f"{t.median_wall / base.median_wall:.2f}x",
                 f"{t.median_cpu - base.median_cpu:+.3f} s",
                 f"{t.median_cpu / base.median_cpu:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(timings: dict[str, Timing], repeats: int, flags: str, load: float) -> str:
    """The section of ``RESULTS.md``, with the command that reproduces it."""
    _, cli = _cli()
    return (
        "## Start-up: `import secateurs` and `secateurs --help` against importing torch\n\n"
        f"Command: `python benchmarks/imports.py{flags}`. Machine: {os.cpu_count()} CPU cores "
        f"({platform.machine()}), Python {platform.python_version()}; load average "
        f"{load:.1f} when it started (the machine is shared). Each row is a whole fresh "
        f"process (`python -c ...`, and the `{cli}` console script), the rows alternating in "
        f"{repeats} rounds after a warm-up round; medians of wall time and of CPU time (user "
        "+ system of the child, from `getrusage(RUSAGE_CHILDREN)`), differences and ratios "
        "against the baseline of the same run. `import secateurs` imports no submodule and "
        "neither torch nor scikit-learn nor matplotlib: the top-level names and subpackages "
        "load on first use. `first use of the core` touches `sc.Pruner`, `sc.prune_`, "
        "`sc.save` and `sc.controllers`, which import torch.\n\n"
        f"{table(timings)}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_REPEATS} rounds instead of {REPEATS}")
    parser.add_argument("--repeats", type=int, help="rounds (overrides --quick)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    load = os.getloadavg()[0]
    timings = measure(commands(), repeats)
    print(table(timings))
    flags = (" --quick" if args.quick and not args.repeats else "") + \
        (f" --repeats {args.repeats}" if args.repeats else "")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "imports.md").write_text(section(timings, repeats, flags, load))


if __name__ == "__main__":
    main()
