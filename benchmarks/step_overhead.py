"""Training-step overhead of pruning: ``secateurs.Pruner`` against ``torch.nn.utils.prune``.

Three variants train copies of one seeded model on the same synthetic batches (forward,
backward, SGD with momentum or AdamW): ``dense``; ``secateurs.Pruner``, stepped right after
``optimizer.step()`` along the cubic schedule of Zhu & Gupta (2017),
``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` up to ``s_f = 0.9``, global
magnitude ranking; and ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``
at the same steps, its relative amounts converted from the same cumulative targets,
``amount_t = (s_t - s_prev) / (1 - s_prev)`` (it re-parametrises each weight as
``weight_orig * weight_mask`` in a forward pre-hook).

Steps are timed one by one, in wall-clock and in process CPU time (all threads). The
variants take turns in rounds, the order rotating, so machine noise hits all alike; figures
are medians of per-round medians and ratios medians of per-round ratios to the dense
round. Memory: the tensors each method keeps between steps, cross-checked with the RSS of
a fresh process per variant; one steady-state step of each is profiled with
``torch.profiler`` (``profile_memory=True``).

Usage: ``python benchmarks/step_overhead.py [--quick] [--results-dir DIR] [--only MODEL ...]``.
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

# Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads
# lose their time slices and every small operation waits for them (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.profiler import ProfilerActivity, profile, record_function

import secateurs
from secateurs.masks import zero_masked_
from secateurs.schedules import Cubic
from secateurs.targets import resolve_targets

CORES = 2  # probes run two at a time, one per core
SEED = 0
FINAL_SPARSITY = 0.9
PHASES = ("zero_grad", "forward", "backward", "optimizer.step", "prune")
RESULTS = Path(__file__).resolve().parent / "results"
Batch = tuple[torch.Tensor, torch.Tensor]
Results = dict[tuple[str, str], dict[str, Any]]  # (model, optimizer) -> figures
RSS = dict[tuple[str, str], dict[str, float]]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def mlp8() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


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
    "mlp8": Workload(mlp8, (1024,), 32, "8 x Linear(1024, 1024) with ReLU between, batch 32"),
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
PLANS = {"full": Plan(every=10, updates=10, steady_rounds=10),
         "quick": Plan(every=2, updates=3, steady_rounds=3, batch_divisor=4, threads=1)}


OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True),
}
OPTIMIZER_TEXT = {
    "sgd": "SGD (lr 0.01, momentum 0.9)",
    "adamw": "AdamW (lr 0.001, weight decay 0.01; torch's default kernels, a loop over "
             "parameters on a CPU)",
    "adamw-fused": "the same AdamW with `fused=True` (the Hugging Face Trainer's default "
                   "optimizer, `adamw_torch_fused`)",
}
FRAMEWORK_PLAN = {"rounds": 8, "steps": 20, "warmup": 3}
#: Quick runs (tests) only exercise the code: two optimizers are enough.
QUICK_OPTIMIZERS = ("sgd", "adamw")


class Run:
    """Dense training: forward, backward, optimizer step. Subclasses add pruning."""

    def __init__(self, model: nn.Module, plan: Plan, optimizer: str = "sgd") -> None:
        self.model = model
        self.opt = OPTIMIZERS[optimizer](model.parameters())
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
    def __init__(self, model: nn.Module, plan: Plan, optimizer: str = "sgd") -> None:
        super().__init__(model, plan, optimizer)
        self.pruner = secateurs.Pruner(model, sparsity=self.schedule, criterion="magnitude",
                                       scope="global", update_every=plan.every,
                                       optimizer=self.opt)

    def prune(self) -> bool:
        return self.pruner.step()

    def state(self) -> object:
        return self.pruner


class TorchPruneRun(Run):
    def __init__(self, model: nn.Module, plan: Plan, optimizer: str = "sgd") -> None:
        super().__init__(model, plan, optimizer)
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


def build_runs(workload: Workload, plan: Plan, names: Iterable[str] = VARIANTS,
               optimizer: str = "sgd") -> dict[str, Run]:
    """One run per variant, each on a copy of the same seeded initialisation."""
    torch.manual_seed(SEED)
    base = workload.build()
    return {name: VARIANTS[name](copy.deepcopy(base), plan, optimizer) for name in names}


def make_batches(workload: Workload, plan: Plan, count: int = 4) -> list[Batch]:
    gen = torch.Generator().manual_seed(SEED)
    n = max(1, workload.batch // plan.batch_divisor)
    return [(torch.randn(n, *workload.input_shape, generator=gen),
             torch.randint(0, 10, (n,), generator=gen)) for _ in range(count)]


# -- time ------------------------------------------------------------------------------

Rounds = dict[str, list[list[tuple[float, float, bool]]]]  # (wall s, CPU s, updated)


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
                    start, cpu = time.perf_counter(), time.process_time()
                    updated = run.step(*batches[run.t % len(batches)])
                    out[name][-1].append((time.perf_counter() - start,
                                          time.process_time() - cpu, updated))
    finally:
        gc.enable()
    return out


def _median(xs: Iterable[float]) -> float:
    values = list(xs)
    return statistics.median(values) if values else float("nan")


def summarise(rounds: Rounds) -> dict[str, dict[str, float]]:
    """Per variant: median of round medians and of round means, their ratios to dense, the
    same for CPU time, and the median mask-update step (its ratio: against the median of
    the dense round)."""
    base = [_median(s for s, _, _ in rnd) for rnd in rounds["dense"]]
    base_cpu = [_median(c for _, c, _ in rnd) for rnd in rounds["dense"]]
    out = {}
    for name, rnds in rounds.items():
        meds = [_median(s for s, _, _ in rnd) for rnd in rnds]
        cpus = [_median(c for _, c, _ in rnd) for rnd in rnds]
        means = [statistics.fmean(s for s, _, _ in rnd) for rnd in rnds]
        ups = [(s, b) for rnd, b in zip(rnds, base, strict=True) for s, _, u in rnd if u]
        out[name] = {
            "median": _median(meds), "mean": _median(means), "cpu": _median(cpus),
            "median_x": _median(m / b for m, b in zip(meds, base, strict=True)),
            "mean_x": _median(m / b for m, b in zip(means, base, strict=True)),
            "cpu_x": _median(m / b for m, b in zip(cpus, base_cpu, strict=True)),
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


def measure_rss(quick: bool, plan: Plan, models: list[str]) -> RSS:
    """:func:`probe` for every workload and variant, each in a fresh process."""
    # A fixed mmap threshold makes glibc hand every large freed block back at once, so the
    # final RSS follows live tensors rather than the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    # Each probe starts an interpreter; quick runs (tests) probe the first workload only.
    jobs = [(w, v) for w in models[:1 if quick else None] for v in VARIANTS]

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


SCALE_OP = "gradients.mul_(1.0) (one read and write of them, for scale)"


def pruner_costs(run: PrunerRun, reps: int) -> dict[str, tuple[float, float, float]]:
    """(Median, fastest, median CPU) seconds, in steady state, of ``Pruner.step()``, of the
    optimizer step it precedes with its gradient masking, of that masking alone, of what a
    mask change adds, and of ``torch.where`` over weights and state (each step, before)."""
    masks, opt = run.pruner.masks, run.opt
    zero = torch.zeros(())
    tensors = [(v, masks[t.name]) for t in run.pruner.targets
               for v in [t.param.detach(), *opt.state[t.param].values()]
               if isinstance(v, torch.Tensor) and v.shape == masks[t.name].shape]
    ops: dict[str, Callable[[], object]] = {
        "Pruner.step()": run.pruner.step,
        "optimizer.step() (gradients masked first)": opt.step,
        "MaskSet.apply_to_gradients_()": masks.apply_to_gradients_,
        SCALE_OP: lambda: [
            t.param.grad.mul_(1.0) for t in run.pruner.targets if t.param.grad is not None],
        "MaskSet.apply_() + apply_to_optimizer_() (at a mask change)":
            lambda: (masks.apply_(), masks.apply_to_optimizer_(opt)),
        "torch.where on weights + optimizer state": lambda: [
            torch.where(m, v, zero, out=v) for v, m in tensors],
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in ops}
    for _ in range(reps):
        for name, op in ops.items():
            start, cpu = time.perf_counter(), time.process_time()
            op()
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    return {k: (_median(w for w, _ in v), min(w for w, _ in v), _median(c for _, c in v))
            for k, v in times.items()}


HOOKED = "backward, gradients masked in post-accumulate-grad hooks"
PLAIN = "backward"


def hook_costs(run: PrunerRun, batch: Batch, reps: int) -> dict[str, tuple[float, float, float]]:
    """(Median, fastest, median CPU) seconds of the backward pass alone and of the same with
    every masked gradient zeroed by a post-accumulate-grad hook as autograd accumulates it
    (while it may still be in the cache), the alternative to masking before the step."""
    masks = run.pruner.masks

    def masker(name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                zero_masked_(p.grad, masks[name])
        return hook

    times: dict[str, list[tuple[float, float]]] = {PLAIN: [], HOOKED: []}
    for _ in range(reps):
        for name in times:
            handles = [] if name == PLAIN else [
                masks.target(n).param.register_post_accumulate_grad_hook(masker(n))
                for n in masks.sparse_names()]
            run.opt.zero_grad()
            loss = F.cross_entropy(run.model(batch[0]), batch[1])
            start, cpu = time.perf_counter(), time.process_time()
            loss.backward()
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
            for h in handles:
                h.remove()
    run.opt.zero_grad()
    return {k: (_median(w for w, _ in v), min(w for w, _ in v), _median(c for _, c in v))
            for k, v in times.items()}


def measure(name: str, optimizer: str, plan: Plan, reps: int) -> dict[str, Any]:
    """Time, count and profile every variant on one workload under one optimizer."""
    workload = WORKLOADS[name]
    runs = build_runs(workload, plan, optimizer=optimizer)
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
        "hooks": hook_costs(pruner, batches[0], reps),
    }


# -- report ----------------------------------------------------------------------------


def table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(c) + " |" for c in [head, ["---"] * len(head), *rows])


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def time_table(res: Results) -> str:
    rows = []
    for (model, opt), r in res.items():
        for v in VARIANTS:
            a, s = r["ramp"][v], r["steady"][v]
            upd = ["-", "-"] if v == "dense" else [ms(a["update"]), f"{a['update_x']:.2f}"]
            rows.append([model, opt, v, ms(a["median"]), f"{a['median_x']:.3f}", ms(a["cpu"]),
                         f"{a['cpu_x']:.3f}", ms(a["mean"]), f"{a['mean_x']:.3f}",
                         ms(s["median"]), f"{s['median_x']:.3f}", ms(s["cpu"]),
                         f"{s['cpu_x']:.3f}", *upd, str(a["updates"])])
    return table(["model", "optimizer", "method", "step while pruning (ms)", "x dense",
                  "CPU (ms)", "x dense", "mean step while pruning (ms)", "x dense",
                  "steady-state step (ms)", "x dense", "CPU (ms)", "x dense",
                  "mask-update step (ms)", "x dense step", "mask updates"], rows)


def memory_table(res: Results, rss: RSS) -> str:
    rows = []
    first = next(iter(OPTIMIZERS))
    for (model, opt), r in res.items():
        if opt != first:
            continue  # the same masks under every optimizer
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
    for (model, opt), r in res.items():
        for v in VARIANTS:
            a = r["alloc"][v]
            rows.append([model, opt, v, str(sum(c for c, _ in a.values())),
                         f"{sum(b for _, b in a.values()) / 2**20:.2f}",
                         *(f"{a[p][1] / 2**20:.2f} ({a[p][0]})" for p in PHASES)])
    return table(["model", "optimizer", "method", "allocations / step", "MiB allocated / step",
                  *(f"{p}: MiB (allocations)" for p in PHASES)], rows)


def cost_table(res: Results) -> str:
    rows = [[model, opt, f"`{op}`", ms(med), ms(lo), ms(cpu),
             f"{med / r['steady']['dense']['median']:.1%}"]
            for (model, opt), r in res.items() for op, (med, lo, cpu) in r["costs"].items()]
    return table(["model", "optimizer", "operation (steady state)", "median (ms)",
                  "fastest (ms)", "CPU (ms)", "median / dense step"], rows)


def sqrt_probe(reps: int) -> dict[str, float]:
    """Fastest ``torch.sqrt`` (and ``numpy.sqrt``) of 2^20 float32 values in ``(0, 1)``, of
    the same with 90% of them exactly zero (as in the masked entries of Adam's second
    moment), and with 90% of them denormal, in seconds."""
    gen = torch.Generator().manual_seed(SEED)
    dense = torch.rand(1 << 20, generator=gen) + 1e-3
    where = torch.rand(1 << 20, generator=gen) < FINAL_SPARSITY
    cases = {"dense": dense, "zero": torch.where(where, 0.0, dense),
             "denormal": torch.where(where, 1e-40, dense)}
    arrays = {k: x.numpy() for k, x in cases.items() if k != "denormal"}
    ops: dict[str, Callable[[], object]] = {
        **{f"torch {k}": (lambda x=x: torch.sqrt(x)) for k, x in cases.items()},
        **{f"numpy {k}": (lambda a=a: np.sqrt(a)) for k, a in arrays.items()}}
    out = {}
    for name, op in ops.items():
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            op()
            times.append(time.perf_counter() - start)
        out[name] = min(times)
    return out


def findings(res: Results, sqrt: dict[str, float]) -> str:
    """The aims, met or missed, and where the time goes, from the figures above."""
    out, missed = [], False
    for (model, opt), r in res.items():
        st = r["steady"]["secateurs.Pruner"]
        x, cpu = st["median_x"], st["cpu_x"]
        per = sum(r["added"]["secateurs.Pruner"].values()) / r["targets"]
        fast = {op: lo for op, (_, lo, _) in r["costs"].items()}
        hooks = r["hooks"]
        hooked = hooks[HOOKED][0] - hooks[PLAIN][0]
        before = r["costs"]["MaskSet.apply_to_gradients_()"][0]
        miss = min(x, cpu) > 1.05
        missed |= miss
        out.append(
            f"- **{model}, {opt}**: `secateurs.Pruner` steady-state step {x - 1:+.1%} over "
            f"dense in wall-clock time, {cpu - 1:+.1%} in CPU time (aim <= +5%: "
            f"{'missed' if miss else 'met'}); {per:.4f} bytes per target weight (aim <= 1: "
            f"{'met' if per < 1.001 else 'missed'}). Fastest repetitions: `Pruner.step()` "
            f"{ms(fast['Pruner.step()'])} ms, the gradient masking before each optimizer "
            f"step {ms(fast['MaskSet.apply_to_gradients_()'])} ms, weights and optimizer "
            f"state at a mask change "
            f"{ms(fast['MaskSet.apply_() + apply_to_optimizer_() (at a mask change)'])} ms, "
            f"against {ms(fast['torch.where on weights + optimizer state'])} ms for "
            f"`torch.where` over weights and state at every step, as before. The masking "
            f"takes {ms(fast['MaskSet.apply_to_gradients_()'] * 1e6 / r['targets'])} ms "
            f"per million target weights, one read and write of the gradients "
            f"{ms(fast[SCALE_OP] * 1e6 / r['targets'])} ms. Masking in post-accumulate-grad "
            f"hooks instead adds {ms(hooked)} ms to the backward "
            f"pass (median; fastest {ms(hooks[HOOKED][1] - hooks[PLAIN][1])} ms) against "
            f"{ms(before)} ms for the masking before "
            f"the step ({hooked / before:.2f}x).")
    lead = "Why the time aim is missed" if missed else "Where the time goes"
    zeros = (f"\n\nExact zeros in the optimizer state have a cost of their own on this "
             f"machine: `torch.sqrt` of 2^20 float32 values takes {ms(sqrt['torch dense'])} "
             f"ms, {ms(sqrt['torch zero'])} ms when 90% of them are zero and "
             f"{ms(sqrt['torch denormal'])} ms when they are denormal (`numpy.sqrt`: "
             f"{ms(sqrt['numpy dense'])} and {ms(sqrt['numpy zero'])} ms), and torch's "
             "default AdamW takes the square root of its second moment at every step, in "
             "which every masked entry is zero. The fused AdamW (`fused=True`, the Hugging "
             "Face Trainer's default) computes it in its own kernel and does not slow down. "
             "Zeros there are what keeping pruned weights exactly zero means: the second "
             "moment of a zero gradient decays to zero in any case, through denormals.")
    return "\n".join(out) + f"\n\n{lead}: " + WHY + zeros


WHY = """\
with SGD (momentum, weight decay), Adam, AdamW and the other element-wise optimizers, a
pruned weight with zero optimizer state stays exactly zero under a zero gradient. So
`Pruner.step()` zeroes weights and optimizer state only when the masks change, and in
between an optimizer step pre-hook zeroes the masked entries of the gradients, once per
optimizer step (after gradient accumulation and clipping; inside the closure when the step
is given one): one pass over the target weights instead of one over weights and one per
state tensor (three for AdamW, 24 `torch.where` calls per step on mlp8 before). The
masking itself no longer uses `torch.where(mask, w, 0, out=w)`, whose CPU kernel for a
bool condition is a scalar loop: each float tensor is seen as integers of its width and
multiplied in place by the mask's bytes, bit for bit the same result (NaN or Inf under the
mask become zero, a kept `-0.0` stays), vectorised and without allocation. What is left in
a steady-state step is that pass over the gradients and a few Python checks. With another
optimizer, or none given to the pruner, weights (and state) are zeroed at every step as
before, with the faster kernel. `torch.nn.utils.prune` keeps `weight_orig`, a float
`weight_mask` and their product (`weight`), multiplies them in every forward and backward,
and every `global_unstructured` call leaves in each `PruningContainer` a `CustomFromMask`
holding a view of that call's flat float mask: 4 bytes more per target weight per mask
update. Masking each gradient as autograd accumulates it, in post-accumulate-grad hooks,
is measured beside it (last sentence of each line above) and is no cheaper here, so the
masking stays before the step. The floor of the masking is one read and write of the
gradients plus a read of the mask bytes; torch's CPU kernels reach it only for operands of
one dtype, and multiplying by the mask's bytes first widens them in a temporary, which is
most of the difference. What would reach the aim on weight-heavy models is a kernel that
reads the bool mask inside the optimizer's own update (a masked fused step: one byte more
read per weight, no pass of its own); torch has none. Under load from other processes, two
intra-op threads wait for each other at every parallel operation, so wall-clock medians
grow and their ratios blur; CPU time (of every thread of the process) and the fastest
repetition of an operation are the better estimates of its own cost.
"""


def cpu_name() -> str:
    lines: list[str] = []
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def render(res: Results, rss: RSS, command: str, plan: Plan, load: tuple[float, float],
           sqrt: dict[str, float], frameworks: str | None = None) -> str:
    models = "; ".join(f"**{k}**: {w.description}" for k, w in WORKLOADS.items()
                       if any(m == k for m, _ in res))
    optimizers = " and ".join(OPTIMIZER_TEXT[o] for o in dict.fromkeys(o for _, o in res))
    realised = ", ".join(f"{m}/{o} {r['sparsity']:.3f}" for (m, o), r in res.items())
    return "\n\n".join([
        "## Training-step overhead: `secateurs.Pruner` vs `torch.nn.utils.prune`",
        f"Command: `{command}`",
        f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}, "
        f"`torch.set_num_threads({plan.threads})`, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, Python {platform.python_version()}; "
        f"load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        f"Setup: {models}{f' (batches / {plan.batch_divisor})' * (plan.batch_divisor > 1)}. "
        f"{optimizers}, synthetic batches, seed {SEED}. Cubic schedule 0 -> "
        f"{FINAL_SPARSITY} in {plan.updates} mask updates, one every {plan.every} steps, "
        f"global magnitude ranking (realised sparsity: {realised}). {plan.updates} rounds "
        f"while pruning and {plan.steady_rounds} in steady state, each {plan.every} timed "
        "steps of every variant in rotating order; times are medians of per-round medians "
        "(of means for the mean column), ratios medians of per-round ratios to dense; CPU "
        "is the process's CPU time over all its threads.",
        "### Step time", time_table(res),
        "### Memory",
        "Bytes kept between steps (parameters, gradients, buffers, module attributes, "
        "tensors held by hooks, optimizer and pruner state; each storage once) minus the "
        f"dense run's, under {OPTIMIZER_TEXT[next(iter(OPTIMIZERS))]}. RSS: a fresh process "
        "per variant trained through the same "
        "sparsities; the peak (`VmHWM`) counts from the end of the dense warm-up, so it "
        "includes the transient buffers of mask updates; the anonymous RSS at the end runs "
        "with `MALLOC_MMAP_THRESHOLD_=65536`, so freed blocks leave the process.",
        memory_table(res, rss),
        "### Allocations in one steady-state step (`torch.profiler`, `profile_memory=True`)",
        "All bytes allocated in the step, transient ones included: the gradient masking "
        "in `optimizer.step` widens the mask's bytes to the gradient's width in chunks of "
        "2^20 elements, so at most 4 MiB (float32) of it is live at a time.",
        alloc_table(res),
        "### Where `Pruner.step()` spends its time", cost_table(res),
        *([] if frameworks is None else [
            "### Inside training frameworks and under `torch.compile`",
            f"{'; '.join(WORKLOADS[m].description for m in FRAMEWORK_MODELS)}. A dense and "
            f"a pruned copy (sparsity "
            f"{FINAL_SPARSITY}, masks computed at the first step), each trained "
            f"{FRAMEWORK_PLAN['warmup']} untimed then {FRAMEWORK_PLAN['steps']} timed "
            f"steps per round, {FRAMEWORK_PLAN['rounds']} rounds in alternating order; "
            "the Trainer's step is timed from `on_step_begin` to `on_step_end` (the "
            "pruning callback steps in `on_optimizer_step`, between them), Lightning's "
            "from `on_train_batch_start` to `on_train_batch_end` (after the pruning "
            "callback's), the compiled models' in a plain loop with the pruner built on "
            "the original module, steps of the two taking turns. Medians of the rounds' "
            "medians; ratios medians of per-round ratios.", frameworks]),
        "### Aims and findings", findings(res, sqrt),
    ])


FRAMEWORK_MODELS = ("mlp", "cnn")


def frameworks_table() -> str:
    """The section of ``_frameworks.py`` (beside this script) on the mlp and cnn workloads."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import _frameworks

    res = {}
    for name in FRAMEWORK_MODELS:
        w = WORKLOADS[name]
        got = _frameworks.measure(w.build, w.input_shape, w.batch, sparsity=FINAL_SPARSITY,
                                  **FRAMEWORK_PLAN)
        res.update({f"{name}: {setting}": pairs for setting, pairs in got.items()})
    return _frameworks.table(res)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Training-step overhead of pruning.")
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help=f"where step_overhead.md goes (default {RESULTS})")
    parser.add_argument("--threads", type=int, help="torch threads (default: 2; 1 with "
                        "--quick)")
    parser.add_argument("--only", nargs="+", choices=list(WORKLOADS), metavar="MODEL",
                        help=f"measure these models only ({', '.join(WORKLOADS)})")
    parser.add_argument("--frameworks-only", action="store_true",
                        help="only the section inside training frameworks, printed")
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
    if args.frameworks_only:
        print(frameworks_table())
        return 0
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    models = args.only or list(WORKLOADS)
    start_load, res = os.getloadavg()[0], {}
    for name in models:
        for opt in QUICK_OPTIMIZERS if args.quick else OPTIMIZERS:
            print(f"measuring {name} with {opt} ...", flush=True)
            res[name, opt] = measure(name, opt, plan, reps=5 if args.quick else 50)
    load = (start_load, os.getloadavg()[0])
    print("measuring RSS in fresh processes ...", flush=True)
    command = "python benchmarks/step_overhead.py" + " --quick" * args.quick + \
        f" --threads {args.threads}" * (args.threads is not None) + \
        f" --only {' '.join(args.only or [])}" * bool(args.only)
    sqrt = sqrt_probe(reps=5 if args.quick else 50)
    frameworks = None
    if not args.quick and not args.only:  # quick runs (tests) leave the frameworks out
        print("measuring inside training frameworks ...", flush=True)
        frameworks = frameworks_table()
    text = render(res, measure_rss(args.quick, plan, models), command, plan, load, sqrt,
                  frameworks)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "step_overhead.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
