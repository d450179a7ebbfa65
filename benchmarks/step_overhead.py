"""Training-step overhead of pruning: ``secateurs.Pruner`` against ``torch.nn.utils.prune``.

Three variants train copies of one seeded model on the same synthetic batches (forward,
backward, SGD with momentum): ``dense``; ``secateurs.Pruner``, stepped right after
``optimizer.step()`` along the cubic schedule of Zhu & Gupta (2017),
``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` up to ``s_f = 0.9``, global
magnitude ranking; and ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``
at the same steps, its relative amounts converted from the same cumulative targets,
``amount_t = (s_t - s_prev) / (1 - s_prev)`` (it re-parametrises each weight as
``weight_orig * weight_mask`` in a forward pre-hook).

Steps are timed one by one. The variants take turns in rounds, the order rotating, so
machine noise hits all alike; figures are medians of per-round medians and ratios medians
of per-round ratios to the dense round. Memory: the tensors each method keeps between
steps, cross-checked with the RSS of a fresh process per variant; one steady-state step
of each is profiled with ``torch.profiler`` (``profile_memory=True``).

Usage: ``python benchmarks/step_overhead.py [--quick] [--results-dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.profiler import ProfilerActivity, profile, record_function

import secateurs
from secateurs.schedules import Cubic
from secateurs.targets import resolve_targets

CORES = 2  # probes run two at a time, one per core
SEED = 0
FINAL_SPARSITY = 0.9
PHASES = ("zero_grad", "forward", "backward", "optimizer.step", "prune")
RESULTS = Path(__file__).resolve().parent / "results"
Batch = tuple[torch.Tensor, torch.Tensor]
Results = dict[str, dict[str, Any]]
RSS = dict[tuple[str, str], dict[str, float]]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def cnn() -> nn.Module:
    layers: list[nn.Module] = []
    for cin, cout in [(3, 32), (32, 64), (64, 128), (128, 256)]:
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(1024, 256), nn.ReLU(),
                         nn.Linear(256, 10))


@dataclass(frozen=True)
class Workload:
    """A model factory and the shape of its batches."""

    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int
    description: str


WORKLOADS = {
    "mlp": Workload(mlp, (1, 28, 28), 128, "MLP 784-1024-1024-10 on 1x28x28, batch 128"),
    "cnn": Workload(cnn, (3, 32, 32), 64, "VGG-style CNN (3x3 conv 32-64-128-256 with "
                    "batch norm and pooling, linear 1024-256-10) on 3x32x32, batch 64"),
}


@dataclass(frozen=True)
class Plan:
    """Untimed warm-up rounds, then one round per mask update (the update is its last
    step), then steady-state rounds; a round is ``every`` steps of each variant."""

    every: int
    updates: int
    steady_rounds: int
    warmup_rounds: int = 1
    batch_divisor: int = 1
    threads: int = 2

    @property
    def begin(self) -> int:
        return self.every * self.warmup_rounds

    def schedule(self) -> Cubic:
        return Cubic(initial=0.0, final=FINAL_SPARSITY, begin_step=self.begin,
                     end_step=self.begin + self.every * self.updates, frequency=self.every)

    def for_probe(self) -> Plan:
        """The same sequence of sparsities with one step between updates."""
        return Plan(1, self.updates, 5, 2, self.batch_divisor, self.threads)


# Quick runs only exercise the code (tests): smaller batches, a handful of steps, and one
# thread, which stays fast when other processes hold the cores.
PLANS = {"full": Plan(every=10, updates=10, steady_rounds=15),
         "quick": Plan(every=2, updates=3, steady_rounds=3, batch_divisor=4, threads=1)}


class Run:
    """Dense training: forward, backward, SGD with momentum. Subclasses add pruning."""

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.schedule, self.every, self.t = plan.schedule(), plan.every, 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """One training step; ``True`` when it recomputed masks."""
        with record_function("zero_grad"):
            self.opt.zero_grad()
        with record_function("forward"):
            loss = F.cross_entropy(self.model(x), y)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer.step"):
            self.opt.step()
        with record_function("prune"):
            updated = self.prune()
        self.t += 1
        return updated

    def prune(self) -> bool:
        return False

    def state(self) -> object:
        """What the method keeps outside the model and the optimizer."""
        return None


class PrunerRun(Run):
    def __init__(self, model: nn.Module, plan: Plan) -> None:
        super().__init__(model, plan)
        self.pruner = secateurs.Pruner(model, sparsity=self.schedule, criterion="magnitude",
                                       scope="global", update_every=plan.every,
                                       optimizer=self.opt)

    def prune(self) -> bool:
        return self.pruner.step()

    def state(self) -> object:
        return self.pruner


class TorchPruneRun(Run):
    def __init__(self, model: nn.Module, plan: Plan) -> None:
        super().__init__(model, plan)
        self.params = [(t.module, t.param_name) for t in resolve_targets(model)]
        self.applied = 0.0

    def prune(self) -> bool:
        target = self.schedule(self.t)
        if self.t % self.every or target == self.applied:
            return False
        # Its amount is a fraction of the weights still unpruned, not a cumulative target.
        amount = (target - self.applied) / (1.0 - self.applied)
        torch_prune.global_unstructured(self.params, pruning_method=torch_prune.L1Unstructured,
                                        amount=amount)
        self.applied = target
        return True


VARIANTS: dict[str, type[Run]] = {
    "dense": Run, "secateurs.Pruner": PrunerRun, "torch.nn.utils.prune": TorchPruneRun,
}


def build_runs(workload: Workload, plan: Plan, names: Iterable[str] = VARIANTS
               ) -> dict[str, Run]:
    """One run per variant, each on a copy of the same seeded initialisation."""
    torch.manual_seed(SEED)
    base = workload.build()
    return {name: VARIANTS[name](copy.deepcopy(base), plan) for name in names}


def make_batches(workload: Workload, plan: Plan, count: int = 4) -> list[Batch]:
    gen = torch.Generator().manual_seed(SEED)
    n = max(1, workload.batch // plan.batch_divisor)
    return [(torch.randn(n, *workload.input_shape, generator=gen),
             torch.randint(0, 10, (n,), generator=gen)) for _ in range(count)]


# -- time ------------------------------------------------------------------------------

Rounds = dict[str, list[list[tuple[float, bool]]]]


def run_rounds(runs: dict[str, Run], batches: list[Batch], rounds: int, steps: int) -> Rounds:
    """``rounds`` rounds of ``steps`` timed steps per variant, the variants taking turns
    step by step (so a burst of load from other processes hits them alike) in an order
    that rotates from round to round."""
    out: Rounds = {name: [] for name in runs}
    names = list(runs)
    gc.collect()
    gc.disable()  # a collection pause would land on whichever variant happens to run
    try:
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                out[name].append([])
            for _ in range(steps):
                for name in order:
                    run = runs[name]
                    start = time.perf_counter()
                    updated = run.step(*batches[run.t % len(batches)])
                    out[name][-1].append((time.perf_counter() - start, updated))
    finally:
        gc.enable()
    return out


def _median(xs: Iterable[float]) -> float:
    values = list(xs)
    return statistics.median(values) if values else float("nan")


def summarise(rounds: Rounds) -> dict[str, dict[str, float]]:
    """Per variant: median of round medians and of round means, their ratios to dense, and
    the median mask-update step (its ratio: against the median of the dense round)."""
    base = [_median(s for s, _ in rnd) for rnd in rounds["dense"]]
    out = {}
    for name, rnds in rounds.items():
        meds = [_median(s for s, _ in rnd) for rnd in rnds]
        means = [statistics.fmean(s for s, _ in rnd) for rnd in rnds]
        ups = [(s, b) for rnd, b in zip(rnds, base, strict=True) for s, u in rnd if u]
        out[name] = {
            "median": _median(meds), "mean": _median(means),
            "median_x": _median(m / b for m, b in zip(meds, base, strict=True)),
            "mean_x": _median(m / b for m, b in zip(means, base, strict=True)),
            "update": _median(s for s, _ in ups), "update_x": _median(s / b for s, b in ups),
            "updates": len(ups),
        }
    return out


# -- memory ----------------------------------------------------------------------------


class Bytes:
    """Bytes of distinct tensor storages, by the name that holds each."""

    def __init__(self) -> None:
        self.by_name: Counter[str] = Counter()
        self._seen: set[int] = set()

    def add(self, t: torch.Tensor, name: str) -> None:
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.by_name[name] += storage.nbytes()

    def walk(self, obj: object, name: str, depth: int = 0) -> None:
        """Tensors reachable through containers and attributes, not through modules or
        optimizers (counted on their own)."""
        if isinstance(obj, torch.Tensor):
            self.add(obj, name)
        elif depth > 8 or isinstance(obj, (nn.Module, torch.optim.Optimizer, str)):
            return
        elif isinstance(obj, (dict, list, tuple, set)):
            for v in obj.values() if isinstance(obj, dict) else obj:
                self.walk(v, name, depth + 1)
        elif hasattr(obj, "__dict__"):
            for k, v in vars(obj).items():
                self.walk(v, f"{name}.{k}", depth + 1)


def kept_bytes(run: Run) -> Counter[str]:
    """Bytes a run keeps between steps: parameters and their gradients, buffers, tensors
    set as module attributes or held by hooks, optimizer state, the method's state."""
    acc = Bytes()
    for module in run.model.modules():
        for name, p in module._parameters.items():
            for t, label in [(p, name), (None if p is None else p.grad, "grad")]:
                if t is not None:
                    acc.add(t, label)
        for name, value in [*module._buffers.items(), *vars(module).items()]:
            if isinstance(value, torch.Tensor):
                acc.add(value, name)
        for hook in module._forward_pre_hooks.values():
            acc.walk(hook, "forward pre-hook")
    for state in run.opt.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                acc.add(value, name)
    acc.walk(run.state(), "pruner")
    return acc.by_name


def added_bytes(run: Run, dense: Run) -> dict[str, int]:
    """Bytes by holder that ``run`` keeps beyond ``dense`` (holders that differ only)."""
    mine, base = kept_bytes(run), kept_bytes(dense)
    diff = {k: mine[k] - base[k] for k in sorted(set(mine) | set(base))}
    return {k: v for k, v in diff.items() if v}


def proc_status(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status``, in MiB (``None`` where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return None


def probe(workload_name: str, variant: str, plan: Plan) -> dict[str, float]:
    """Train one variant through the schedule in this process: its peak RSS while pruning
    and its anonymous RSS at the end, in MiB."""
    workload, plan = WORKLOADS[workload_name], plan.for_probe()
    run = build_runs(workload, plan, [variant])[variant]
    batches = make_batches(workload, plan)
    for t in range(plan.begin + plan.every * (plan.updates + plan.steady_rounds)):
        if t == plan.begin:  # dense warm-up done: restart the high-water mark (Linux)
            gc.collect()
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        run.step(*batches[run.t % len(batches)])
    gc.collect()
    # ru_maxrss also carries the launching process's RSS across fork and exec on Linux,
    # so the process's own high-water mark is read where there is one.
    peak = proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Anonymous pages only: library code that one variant happens to run is not state.
    return {"peak": peak, "rss": proc_status("RssAnon") or proc_status("VmRSS") or 0.0}


def measure_rss(quick: bool, plan: Plan) -> RSS:
    """:func:`probe` for every workload and variant, each in a fresh process."""
    # A fixed mmap threshold makes glibc hand every large freed block back at once, so the
    # final RSS follows live tensors rather than the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    # Each probe starts an interpreter; quick runs (tests) probe the first workload only.
    jobs = [(w, v) for w in list(WORKLOADS)[:1 if quick else None] for v in VARIANTS]

    def one(job: tuple[str, str]) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--probe", *job, "--threads", str(plan.threads),
               *(["--quick"] if quick else [])]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    # Memory is per process, so two probes at once (one per core) do not disturb each other.
    with ThreadPoolExecutor(max_workers=CORES) as pool:
        return dict(zip(jobs, pool.map(one, jobs), strict=True))


# -- profiles --------------------------------------------------------------------------


def allocations(run: Run, batches: list[Batch]) -> dict[str, tuple[int, int]]:
    """Profile one step: (allocations, bytes allocated) in each phase."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run.step(*batches[run.t % len(batches)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    spans = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("ph") == "X" and e.get("name") in PHASES]
    out = dict.fromkeys(PHASES, (0, 0))
    for e in events:
        size = e["args"].get("Bytes", 0) if e.get("name") == "[memory]" else 0
        phase = next((n for n, a, b in spans if a <= e["ts"] <= b), None) if size > 0 else None
        if phase is not None:
            out[phase] = (out[phase][0] + 1, out[phase][1] + size)
    return out


def pruner_costs(run: PrunerRun, reps: int) -> dict[str, tuple[float, float]]:
    """(Median, fastest) seconds of ``Pruner.step()`` in steady state, of its two passes,
    and of two alternatives leaving the same zeros (finite weights) with one-byte masks."""
    masks, opt = run.pruner.masks, run.opt
    pairs = [(t.param.detach(), masks[t.name].view(torch.uint8)) for t in run.pruner.targets]
    momenta = [(opt.state[t.param]["momentum_buffer"], m) for t, (_, m) in
               zip(run.pruner.targets, pairs, strict=True)]
    grads = [(t.param.grad, m) for t, (_, m) in zip(run.pruner.targets, pairs, strict=True)]
    ops: dict[str, Callable[[], object]] = {
        "Pruner.step()": run.pruner.step,
        "MaskSet.apply_()": masks.apply_,
        "MaskSet.apply_to_optimizer_()": lambda: masks.apply_to_optimizer_(opt),
        "mul_(uint8 mask) on weights + momentum": lambda: [t.mul_(m) for t, m in
                                                           pairs + momenta],
        "mul_(uint8 mask) on gradients only": lambda: [g.mul_(m) for g, m in grads if
                                                       g is not None],
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(reps):
        for name, op in ops.items():
            start = time.perf_counter()
            op()
            times[name].append(time.perf_counter() - start)
    return {k: (_median(v), min(v)) for k, v in times.items()}


def measure(name: str, plan: Plan, reps: int) -> dict[str, Any]:
    """Time, count and profile every variant on one workload."""
    workload = WORKLOADS[name]
    runs = build_runs(workload, plan)
    batches = make_batches(workload, plan)
    for _ in range(plan.begin + 1):  # warm-up, untimed, at sparsity 0
        for run in runs.values():
            run.step(*batches[run.t % len(batches)])
    ramp = run_rounds(runs, batches, plan.updates, plan.every)
    steady = run_rounds(runs, batches, plan.steady_rounds, plan.every)
    pruner = runs["secateurs.Pruner"]
    assert isinstance(pruner, PrunerRun)
    return {
        "targets": sum(t.param.numel() for t in pruner.pruner.targets),
        "sparsity": pruner.pruner.sparsity(),
        "ramp": summarise(ramp), "steady": summarise(steady),
        "added": {v: added_bytes(r, runs["dense"]) for v, r in runs.items()},
        "alloc": {v: allocations(r, batches) for v, r in runs.items()},
        "costs": pruner_costs(pruner, reps),
    }


# -- report ----------------------------------------------------------------------------


def table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(c) + " |" for c in [head, ["---"] * len(head), *rows])


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def time_table(res: Results) -> str:
    rows = []
    for model, r in res.items():
        for v in VARIANTS:
            a, s = r["ramp"][v], r["steady"][v]
            upd = ["-", "-"] if v == "dense" else [ms(a["update"]), f"{a['update_x']:.2f}"]
            rows.append([model, v, ms(a["median"]), f"{a['median_x']:.3f}", ms(a["mean"]),
                         f"{a['mean_x']:.3f}", ms(s["median"]), f"{s['median_x']:.3f}", *upd,
                         str(a["updates"])])
    return table(["model", "method", "step while pruning (ms)", "x dense",
                  "mean step while pruning (ms)", "x dense", "steady-state step (ms)",
                  "x dense", "mask-update step (ms)", "x dense step", "mask updates"], rows)


def memory_table(res: Results, rss: RSS) -> str:
    rows = []
    for model, r in res.items():
        n = r["targets"]
        for v in VARIANTS:
            added = r["added"][v]
            parts = ", ".join(f"`{k}` {b / n:+.2f}" for k, b in added.items()) or "-"
            cells = ["-"] * 4
            if (model, v) in rss:
                mine, base = rss[model, v], rss[model, "dense"]
                cells = [f"{mine['peak']:.0f}", f"{(mine['peak'] - base['peak']) * 2**20 / n:.1f}",
                         f"{mine['rss']:.0f}", f"{(mine['rss'] - base['rss']) * 2**20 / n:.1f}"]
            rows.append([model, v, f"{n:,}", f"{sum(added.values()) / n:.2f}", parts, *cells])
    return table(["model", "method", "target weights", "added bytes / target weight",
                  "by holder (bytes / target weight)", "peak RSS while pruning (MiB)",
                  "- dense (B / weight)", "RSS at end (MiB)", "- dense (B / weight)"], rows)


def alloc_table(res: Results) -> str:
    rows = []
    for model, r in res.items():
        for v in VARIANTS:
            a = r["alloc"][v]
            rows.append([model, v, str(sum(c for c, _ in a.values())),
                         f"{sum(b for _, b in a.values()) / 2**20:.2f}",
                         *(f"{a[p][1] / 2**20:.2f} ({a[p][0]})" for p in PHASES)])
    return table(["model", "method", "allocations / step", "MiB allocated / step",
                  *(f"{p}: MiB (allocations)" for p in PHASES)], rows)


def cost_table(res: Results) -> str:
    rows = [[model, f"`{op}`", ms(med), ms(lo), f"{med / r['steady']['dense']['median']:.1%}"]
            for model, r in res.items() for op, (med, lo) in r["costs"].items()]
    return table(["model", "operation (steady state)", "median (ms)", "fastest (ms)",
                  "median / dense step"], rows)


def findings(res: Results) -> str:
    """The aims, met or missed, and where the time goes, from the figures above."""
    out, missed = [], False
    for model, r in res.items():
        x = r["steady"]["secateurs.Pruner"]["median_x"]
        per = sum(r["added"]["secateurs.Pruner"].values()) / r["targets"]
        theirs = sum(r["added"]["torch.nn.utils.prune"].values()) / r["targets"]
        fast = {op: lo for op, (_, lo) in r["costs"].items()}
        missed |= x > 1.05
        out.append(
            f"- **{model}**: `secateurs.Pruner` steady-state step {x - 1:+.1%} over dense "
            f"(aim <= +5%: {'missed' if x > 1.05 else 'met'}); it keeps {per:.4f} bytes per "
            f"target weight, the bool masks plus one 0-dim zero per target (aim <= 1: "
            f"{'met' if per < 1.001 else 'missed'}); `torch.nn.utils.prune` keeps "
            f"{theirs:.2f}. Fastest repetitions: `Pruner.step()` {ms(fast['Pruner.step()'])} "
            f"ms, its two `torch.where` passes {ms(fast['MaskSet.apply_()'])} + "
            f"{ms(fast['MaskSet.apply_to_optimizer_()'])} ms; the same zeros by `mul_` "
            f"{ms(fast['mul_(uint8 mask) on weights + momentum'])} ms, on gradients only "
            f"{ms(fast['mul_(uint8 mask) on gradients only'])} ms.")
    lead = "Why the time aim is missed" if missed else "Where the remaining time goes"
    return "\n".join(out) + f"\n\n{lead}: " + WHY


WHY = """\
`Pruner.step()` runs `torch.where(mask, w, 0, out=w)`, whose CPU kernel is a scalar
(non-vectorised) loop, over every target element twice per step, weights then momentum,
although with fixed masks only the gradient moves a pruned weight. Two changes keep the
same zeros and the same one-byte masks: `w.mul_(mask.view(torch.uint8))`, vectorised (for
finite weights; a negative one becomes `-0.0`), and masking only the gradient before
`optimizer.step()` (`register_post_accumulate_grad_hook`), which keeps pruned weights and
their SGD-momentum, Adam and AdamW state at zero, so that weights and state need masking
only when masks change. `torch.nn.utils.prune` keeps `weight_orig`, a float `weight_mask`
and their product (`weight`), multiplies them in every forward and backward, and every
`global_unstructured` call leaves in each `PruningContainer` a `CustomFromMask` holding a
view of that call's flat float mask: 4 bytes more per target weight per mask update.
Under load from other processes, two intra-op threads wait for each other at every
parallel operation, so medians grow and their ratios blur; the fastest repetition of an
operation is the better estimate of its own cost (as `timeit` reports).
"""


def cpu_name() -> str:
    lines: list[str] = []
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def render(res: Results, rss: RSS, command: str, plan: Plan, load: tuple[float, float]
           ) -> str:
    models = "; ".join(f"**{k}**: {w.description}" for k, w in WORKLOADS.items())
    realised = ", ".join(f"{m} {r['sparsity']:.3f}" for m, r in res.items())
    return "\n\n".join([
        "## Training-step overhead: `secateurs.Pruner` vs `torch.nn.utils.prune`",
        f"Command: `{command}`",
        f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}, "
        f"`torch.set_num_threads({plan.threads})`, Python {platform.python_version()}; "
        f"load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        f"Setup: {models}{f' (batches / {plan.batch_divisor})' * (plan.batch_divisor > 1)}. "
        f"SGD (lr 0.01, momentum 0.9), synthetic batches, seed {SEED}. Cubic schedule 0 -> "
        f"{FINAL_SPARSITY} in {plan.updates} mask updates, one every {plan.every} steps, "
        f"global magnitude ranking (realised sparsity: {realised}). {plan.updates} rounds "
        f"while pruning and {plan.steady_rounds} in steady state, each {plan.every} timed "
        "steps of every variant in rotating order; times are medians of per-round medians "
        "(of means for the mean column), ratios medians of per-round ratios to dense.",
        "### Step time", time_table(res),
        "### Memory",
        "Bytes kept between steps (parameters, gradients, buffers, module attributes, "
        "tensors held by hooks, optimizer and pruner state; each storage once) minus the "
        "dense run's. RSS: a fresh process per variant trained through the same "
        "sparsities; the peak (`VmHWM`) counts from the end of the dense warm-up, so it "
        "includes the transient buffers of mask updates; the anonymous RSS at the end runs "
        "with `MALLOC_MMAP_THRESHOLD_=65536`, so freed blocks leave the process.",
        memory_table(res, rss),
        "### Allocations in one steady-state step (`torch.profiler`, `profile_memory=True`)",
        alloc_table(res),
        "### Where `Pruner.step()` spends its time", cost_table(res),
        "### Aims and findings", findings(res),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Training-step overhead of pruning.")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help=f"where step_overhead.md goes (default {RESULTS})")
    parser.add_argument("--threads", type=int, help="torch threads (default: 2; 1 with "
                        "--quick)")
    parser.add_argument("--probe", nargs=2, metavar=("MODEL", "VARIANT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        plan = dataclasses.replace(plan, threads=args.threads)
    torch.set_num_threads(plan.threads)
    if args.probe:
        print(json.dumps(probe(args.probe[0], args.probe[1], plan)))
        return 0
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    start_load, res = os.getloadavg()[0], {}
    for name in WORKLOADS:
        print(f"measuring {name} ...", flush=True)
        res[name] = measure(name, plan, reps=5 if args.quick else 50)
    load = (start_load, os.getloadavg()[0])
    print("measuring RSS in fresh processes ...", flush=True)
    command = "python benchmarks/step_overhead.py" + " --quick" * args.quick + \
        f" --threads {args.threads}" * (args.threads is not None)
    text = render(res, measure_rss(args.quick, plan), command, plan, load)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "step_overhead.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
