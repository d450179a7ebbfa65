"""Structured pruning across model families: parameters, CPU latency and pruning time.

Each family is a small random-init instance of its real ``transformers`` class (the same
ones the conformance suite in ``tests/families.py`` uses: GPT-2, Llama with and without
grouped-query attention, BERT, ViT, ConvNeXt, ResNet, MobileNetV2). Each is pruned with
``secateurs.structured.prune_channels_`` at 50% of the units of every group that can go
(criterion ``l1``, scope ``layer``), compacted, and checked: the compacted model's output
equals the masked model's (``atol=1e-5``, which ``compact_`` verifies). Then the dense and
the compacted model are timed together at batch 8 (``secateurs.structured.latency``:
interleaved rounds, the speedup taken per round against the dense model of that round),
in wall time and, with one thread, in CPU time (``time.process_time``), which other
processes on the shared cores barely disturb.

Usage: ``python benchmarks/families.py [--quick] [--results-dir DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the family definitions the tests use

from families import NAMES, family, main_output  # noqa: E402
from secateurs.structured import count, latency, prune_channels_  # noqa: E402
from secateurs.tables import markdown_table, text_table  # noqa: E402

RESULTS = HERE / "results"
HEADER = ["family", "params dense", "params pruned", "params ratio", "ms dense", "ms pruned",
          "speedup (wall)", "speedup (CPU)", "prune + compact s", "groups pruned / targets kept"]


def measure(name: str, rounds: int, scale: int) -> list[str]:
    """One row: counts, latency ratios and pruning time for family ``name``."""
    fam = family(name, scale)
    dense = fam.build()
    example = fam.inputs(2, 0)
    batch = fam.inputs(8, 1)
    small = copy.deepcopy(dense)
    start = time.perf_counter()
    try:
        result = prune_channels_(small, example, 0.5, "l1")
    except ValueError as exc:
        return [name, f"{count(dense, example).params:,}", "-", "-", "-", "-", "-", "-", "-",
                f"refused: {str(exc)[:80]}"]
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        assert bool(torch.isfinite(main_output(small(**batch))).all())
    wall = latency([dense, small], batch, rounds=rounds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = latency([dense, small], batch, rounds=rounds, clock=time.process_time)
    finally:
        torch.set_num_threads(threads)
    before, after = result.before.params, result.after.params
    pruned = sum(1 for units, left in result.units.values() if left < units)
    return [name, f"{before:,}", f"{after:,}", f"{before / after:.2f}x", f"{wall[0].ms:.2f}",
            f"{wall[1].ms:.2f}", f"{wall[1].speedup:.2f}x", f"{cpu[1].speedup:.2f}x",
            f"{seconds:.2f}", f"{pruned} / {len(result.kept)}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, three families")
    parser.add_argument("--scale", type=int, default=4,
                        help="widths this many times the test suite's smallest models")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    names = ["bert", "vit", "resnet"] if args.quick else NAMES
    rounds = 3 if args.quick else 9
    scale = 1 if args.quick else args.scale
    rows = [measure(n, rounds, scale) for n in names]
    print(text_table(HEADER, rows))
    command = "python benchmarks/families.py" + (" --quick" if args.quick else
                                                  f" --scale {args.scale}")
    section = "\n".join([
        "## Structured pruning across model families", "",
        f"Command: `{command}`. Machine: {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads for wall time, "
        "torch.set_num_threads(1) for CPU time. Each family: a small random-init instance of "
        f"its real `transformers` class at {scale}x the widths of the test suite's smallest "
        f"(`tests/families.py`; e.g. hidden size {64 * scale} for the transformers), "
        "`prune_channels_(model, example, 0.5, 'l1')` "
        "(every group that can go loses half its units; the compacted outputs are checked "
        "equal to the masked model's), then dense and pruned timed together at batch 8, "
        f"{rounds} interleaved rounds; speedups are medians of per-round ratios against "
        "the dense model of the same round. The last column: channel groups that lost "
        "units, and targets whose output channels stayed at full width (model outputs, "
        "normalised widths such as the residual stream, couplings that cannot be "
        "resolved; each with its reason in `result.kept`).", "",
        markdown_table(HEADER, rows), ""])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "families.md").write_text(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
