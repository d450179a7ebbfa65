"""Run every benchmark, then gather their sections into ``benchmarks/RESULTS.md``.

Every ``benchmarks/<name>.py`` except this file (and modules whose name starts with ``_``)
runs in its own process with this Python interpreter, in name order, and writes its
section to ``benchmarks/results/<name>.md``. ``RESULTS.md`` is then rewritten: the header
below, then every ``results/*.md`` in name order. A benchmark that fails does not stop the
others; the exit status is 1 if any failed.

Usage: ``python benchmarks/run_all.py [--quick] [--only NAME ...] [--collect-only]``
(``make bench`` runs it without flags).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

HEADER = """\
# Benchmark results

Written by `python benchmarks/run_all.py` (`make bench`) from the sections that each
`benchmarks/<name>.py` writes to `benchmarks/results/<name>.md`; each section gives the
command that reproduces it. Do not edit by hand.

Figures are medians on a shared, noisy {cores}-core CPU machine: other processes come and
go, so absolute times move from one run to the next. Ratios are measured in the same run,
against a baseline timed alongside the method (interleaved, so the same noise hits both):
compare ratios, not absolute times across runs or sections.
"""


def scripts(root: Path = HERE) -> list[Path]:
    """The benchmark scripts under ``root``, in name order."""
    me = Path(__file__).resolve()
    return sorted(p for p in root.glob("*.py") if p.resolve() != me and not p.name.startswith("_"))


def run(script: Path, quick: bool, timeout: float) -> bool:
    """Run one benchmark in a fresh process; ``True`` when it exits 0 in time."""
    cmd = [sys.executable, str(script), *(["--quick"] if quick else [])]
    print(f"== {script.name}: python {script.parent.name}/{script.name}"
          f"{' --quick' if quick else ''}", flush=True)
    start = time.perf_counter()
    try:
        code = subprocess.run(cmd, cwd=script.parent.parent, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"== {script.name}: no result after {timeout:.0f} s", flush=True)
        return False
    print(f"== {script.name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
    return code == 0


def collect(results: Path) -> str:
    """The header, then every ``results/*.md`` section in name order."""
    sections = [p.read_text().strip() for p in sorted(results.glob("*.md"))]
    cores = os.cpu_count() or 1
    return "\n\n".join([HEADER.format(cores=cores).strip(), *sections]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark; rewrite RESULTS.md.")
    parser.add_argument("--quick", action="store_true",
                        help="pass --quick to every benchmark (a few seconds each)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these benchmarks (file names without .py)")
    parser.add_argument("--collect-only", action="store_true",
                        help="run nothing; rewrite RESULTS.md from the existing sections")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds one benchmark may take (default 1800)")
    args = parser.parse_args(argv)
    chosen = scripts()
    if args.only:
        unknown = sorted(set(args.only) - {p.stem for p in chosen})
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; available: "
                         f"{', '.join(p.stem for p in chosen)}")
        chosen = [p for p in chosen if p.stem in args.only]
    failed = [] if args.collect_only else \
        [p.name for p in chosen if not run(p, args.quick, args.timeout)]
    out = HERE / "RESULTS.md"
    out.write_text(collect(HERE / "results"))
    print(f"wrote {out}")
    if failed:
        print(f"failed: {', '.join(failed)} (their sections, if any, are from earlier runs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
